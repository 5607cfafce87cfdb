"""`mhpo compare`: the trainer once per objective x seed, on one task and config, then a report.

    mhpo compare --objectives mhpo,grpo,dapo,sapo,gspo,cispo,gmpo --seeds 3 [--preset stress]

Every run of a seed starts from the same warm-up checkpoint (one shared, file-locked warm-up
cache per comparison), so within a seed only the objective differs. Runs go to
<output-dir>/runs/<objective>/seed<k>; they run in parallel processes (up to the core count, one
torch thread each) and a run already complete is skipped, a stopped one resumed, so an
interrupted comparison continues where it stopped. An objective may carry hparams:
`mhpo[c=0.5]`. The report is written to <output-dir> (see :mod:`mhpo.compare.report`).
"""

from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from mhpo.errors import UsageError

BASELINES = "mhpo,grpo,dapo,sapo,gspo,cispo,gmpo"


@dataclass(frozen=True)
class Preset:
    objectives: str
    overrides: tuple[str, ...]
    about: str


PRESETS: dict[str, Preset] = {
    "default": Preset(BASELINES, (), "the demo setting of `mhpo train`"),
    "stress": Preset(
        BASELINES,
        ("optim.lr=5e-4", "update.num_minibatches=4", "train.steps=100", "eval.every=25"),
        "off-policy pressure: 2.5x the demo lr and 4 optimizer steps per batch push |log r| p99 to ~1-3 "
        "(measured: lr 1e-3 with 4 steps per batch collapsed both grpo and mhpo to 0% within 25 steps)",
    ),
    "ablation": Preset("mhpo,mhpo-lfm-only,mhpo-dhp-only,mhpo-symmetric", (), "the paper's ablations of MHPO"),
    "c-sweep": Preset("mhpo[c=0.5],mhpo[c=1.0],mhpo[c=1.5],mhpo[c=2.0]", (), "MHPO's LFM bound c"),
}

_SPEC = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[(.*)\])?$")


def parse_objectives(text: str) -> list[tuple[str, str, dict]]:
    """'mhpo,grpo[eps_high=0.28]' -> [(label, name, hparams)], validated against the registry."""
    import yaml

    from mhpo.objectives import get_objective

    specs = []
    for part in _split(text):
        m = _SPEC.match(part)
        if not m:
            raise UsageError(f"bad objective spec {part!r}; expected NAME or NAME[key=value,...]")
        name, hp_text = m.group(1), m.group(2)
        hparams = {}
        for item in filter(None, (hp_text or "").split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise UsageError(f"bad hparam {item!r} in {part!r}; expected key=value")
            hparams[key.strip()] = yaml.safe_load(value)
        try:
            get_objective(name).resolve(hparams)
        except ValueError as err:
            raise UsageError(str(err)) from None
        label = name if not hparams else f"{name}[{','.join(f'{k}={v}' for k, v in sorted(hparams.items()))}]"
        specs.append((label, name, hparams))
    labels = [s[0] for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--objectives lists an objective twice: {text!r}")
    return specs


def _split(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def slug(label: str) -> str:
    """A directory name for a label: mhpo[c=0.5] -> mhpo_c=0.5."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_")


@dataclass(frozen=True)
class Job:
    label: str
    seed: int
    run_dir: str
    config: dict  # the full resolved config of this run


def plan_jobs(base, specs, seeds: list[int], out: Path, threads: int = 0, runs: Path | None = None) -> list[Job]:
    """One job per objective x seed, in ``runs`` (default ``out/runs``); all share the config except
    objective and seed, and one warm-up cache (``out/warmup``: one warm-up per seed).

    ``threads`` (> 0) replaces an automatic ``train.threads`` (0), so that parallel runs share the
    cores instead of each taking all of them."""
    from mhpo.trainer.config import from_dict, to_dict

    jobs = []
    runs = runs or out / "runs"
    warm_cache = str((out / "warmup").resolve())
    for seed in seeds:
        for label, name, hparams in specs:
            tree = to_dict(base)
            tree["seed"] = seed
            tree["objective"]["name"] = name
            tree["objective"]["hparams"] = dict(hparams)
            tree["warmup"]["cache_dir"] = warm_cache
            tree["train"]["progress"] = False
            if threads and not tree["train"]["threads"]:
                tree["train"]["threads"] = threads
            from_dict(tree)  # validate
            jobs.append(Job(label, seed, str(runs / slug(label) / f"seed{seed}"), tree))
    return jobs


def run_job(job: Job) -> dict:
    """Worker: one training run (stdout/stderr to the run's log file); returns its summary."""
    from mhpo.trainer.config import from_dict
    from mhpo.trainer.loop import run_training

    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(job.run_dir) / "train.log", "a", buffering=1) as log:
        sys.stdout, sys.stderr = log, log
        from rich.console import Console

        return run_training(from_dict(job.config), job.run_dir, resume="auto", console=Console(file=log, width=120))


def exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Pool-worker initializer: a daemon thread ends this worker at once (like SIGKILL: the run's
    checkpoints are kill-safe and a rerun resumes exactly) when ``parent`` is no longer its parent.
    Without it, a comparison whose parent was SIGKILLed (the OOM killer) left its workers waiting on
    a pipe for good."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(70)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_jobs(jobs: list[Job], workers: int, echo=print) -> list[tuple[Job, str]]:
    """Run jobs in a pool of `workers` spawned processes; returns the (job, error) that failed."""
    failures = []
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        pending = {pool.submit(run_job, job): job for job in jobs}
        done_count = 0
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job = pending.pop(fut)
                done_count += 1
                try:
                    s = fut.result()
                    echo(
                        f"[{done_count}/{len(jobs)}] {job.label} seed {job.seed}: accuracy "
                        f"{s['accuracy_before_rl']:.1%} -> {s['accuracy_after_rl']:.1%} ({s['wall_seconds']:.0f} s; "
                        f"{time.perf_counter() - t0:.0f} s elapsed)"
                    )
                except Exception as err:  # a failed run is reported, the others go on
                    failures.append((job, f"{type(err).__name__}: {err}"))
                    echo(
                        f"[{done_count}/{len(jobs)}] {job.label} seed {job.seed}: FAILED ({type(err).__name__}: "
                        f"{err}); "
                        f"log: {job.run_dir}/train.log"
                    )
    return failures
