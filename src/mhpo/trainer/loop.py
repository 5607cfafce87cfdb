"""The training run behind `mhpo train` (and each run of `mhpo compare`): RL with verifiable rewards on a
causal LM, GRPO-family objectives.

    run_training(cfg, run_dir)
        prepare_run            validate everything, no model loaded      (mhpo.trainer.setup)
        warm-up                supervised, cached; tiny models only by default
        evaluate before RL     held-out greedy accuracy, pass@k, eval.benchmarks
        RL steps               rl_step (mhpo.trainer.step), evaluations and checkpoints when due
        evaluate after RL, final checkpoint, plots, summary.json          (mhpo.trainer.run_dir)

A finished run is returned as it is, a stopped one resumed from its last complete checkpoint
(exactly: weights, optimizer, RNG, data stream, pending batches). Ctrl-C / SIGTERM checkpoint the
last finished step and say how to continue.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from pathlib import Path

import torch
from rich.console import Console

from mhpo.errors import Interrupted, UsageError
from mhpo.evaluation.hook import open_hook
from mhpo.files import atomic_write_json
from mhpo.generation.policy import quiet_transformers
from mhpo.models.lora import is_peft, merged
from mhpo.seeding import derive_seed
from mhpo.trainer import checkpoint as ckpt
from mhpo.trainer.config import Config, save_config, to_dict
from mhpo.trainer.defaults import config_warnings
from mhpo.trainer.evaluate_run import heldout_results
from mhpo.trainer.interrupts import Interrupts
from mhpo.trainer.metrics import RunLogger
from mhpo.trainer.pending import from_state, to_state
from mhpo.trainer.plots import plot_run
from mhpo.trainer.progress import Progress, accuracy_line
from mhpo.trainer.run_dir import (
    CONFIG_FILE,
    SUMMARY_FILE,
    cfg_hash,
    config_changes,
    config_header,
    load_run_config,
    make_summary,
    read_summary,
    resumed_config,
    save_samples,
)
from mhpo.trainer.setup import Plan, build_policy, model_loader, prepare_run, warmup_stage
from mhpo.trainer.step import rl_step


def run_training(config: Config, output_dir: str | Path, *, resume: str = "auto", console=None) -> dict:
    """Train with ``config`` into ``output_dir``; returns the summary dict (also in summary.json).

    resume: "auto"    - a finished run with this config is returned as is (not retrained), a
                        stopped one continues from its last complete checkpoint, else start fresh;
            "require" - continue a stopped run (error if there is none);
            "never"   - start fresh (error if the directory already holds a run).
    Raises UsageError for a bad config, task, reward function or model (before any model loads).
    """
    t_start = time.perf_counter()
    console = console or Console(highlight=False, soft_wrap=True)  # log lines are never wrapped
    run_dir = Path(output_dir)
    saved_cfg = load_run_config(run_dir) if (run_dir / CONFIG_FILE).exists() else None
    if saved_cfg is None and resume == "require":
        raise UsageError(f"{str(run_dir)!r} holds no run to resume")
    if saved_cfg is not None:
        if resume == "never":
            raise UsageError(f"{str(run_dir)!r} already holds a run")
        changed = config_changes(saved_cfg, config)
        if changed:
            raise UsageError(
                f"{str(run_dir)!r} holds a run with a different config (differs at {', '.join(changed[:3])})"
            )
        config = resumed_config(saved_cfg, config)
        summary = read_summary(run_dir)
        if summary and summary.get("complete") and summary.get("steps") == config.train.steps:
            console.print(
                f"[bold]mhpo train[/]: {run_dir} is already complete ({config.train.steps} steps); nothing to do"
            )
            return summary

    threads = torch.get_num_threads()
    with prepare_run(config) as plan:
        for warning in config_warnings(plan.cfg):
            console.print(f"[bold red]warning[/]: {warning}", highlight=False)
        try:
            torch.set_num_threads(plan.cfg.train.threads)
            quiet_transformers()
            with Interrupts() as stop:
                return _run(plan, run_dir, console, resuming=saved_cfg is not None, t_start=t_start, stop=stop)
        finally:
            torch.set_num_threads(threads)


def _run(plan: Plan, run_dir: Path, console, *, resuming: bool, t_start: float, stop) -> dict:
    """The stages of one run: warm-up, policy, evaluation before RL, RL, evaluation after RL.
    Ctrl-C / SIGTERM anywhere: the last finished step is checkpointed (:meth:`TrainingRun.save_on_stop`)
    and :class:`mhpo.errors.Interrupted` says what survived and how to continue."""
    run = None
    try:
        run = TrainingRun(plan, run_dir, console, resuming=resuming, t_start=t_start, stop=stop)
        run.start()  # a fresh start evaluates the RL-initial policy; a resume restores the checkpoint
        run.train()
        after, final = run.finish()
        return run.write_summary(after, final)
    except KeyboardInterrupt:
        saved = run.save_on_stop() if run is not None else None
        raise Interrupted(stop_message(run_dir, stop, run, saved)) from None
    finally:
        if run is not None:
            run.close()


def stop_message(run_dir: Path, stop, run, saved: Path | None) -> str:
    """One line: which signal stopped the run where, what was saved, and the command that continues."""
    where = f"at RL step {run.trained + 1}/{run.cfg.train.steps}" if run is not None and run.rl_started else "before RL"
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if saved is not None:
        kept = f"checkpoint of step {run.saved_step} saved ({saved})"
    elif latest is not None:
        kept = f"no step finished since the checkpoint {latest.name}" + (
            " (the step in progress was torn by a second signal)" if stop.forced else ""
        )
    else:
        return f"stopped by {stop.name} {where}; no RL step finished, nothing to resume (a --resume would start over)"
    return f"stopped by {stop.name} {where}; {kept}. Continue with: mhpo train --resume {run_dir}"


def _undo_fresh_start(run_dir: Path) -> None:
    """Remove the config a fresh start wrote, and the directory if that leaves it empty; a directory
    holding anything else (warm-up checkpoints, logs) stays as it is."""
    if [p.name for p in run_dir.iterdir()] == [CONFIG_FILE]:
        (run_dir / CONFIG_FILE).unlink()
        run_dir.rmdir()


class TrainingRun:
    """One run directory being trained: its policy, data, logs and checkpoints, and the state a
    checkpoint carries besides weights and optimizer (evaluation before RL, warm-up, wall time)."""

    def __init__(self, plan: Plan, run_dir: Path, console, *, resuming: bool, t_start: float, stop=None):
        cfg = self.cfg = plan.cfg
        self.plan, self.run_dir, self.console, self.t_start = plan, run_dir, console, t_start
        self.stop = stop or Interrupts()
        self.rl_started = False
        run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = run_dir / "checkpoints"
        ckpt.clean_partial(self.ckpt_root)
        self.resume_from = ckpt.resume_checkpoint(self.ckpt_root, warn=self.warn) if resuming else None
        if not resuming:
            save_config(cfg, run_dir / CONFIG_FILE, header=config_header())
        load = model_loader(cfg, log=lambda m: console.print(f"[bold]mhpo train[/]: {m}", highlight=False))
        # The RL-initial policy is only needed when starting, as the KL reference, or as LoRA's base.
        needs_initial = self.resume_from is None or cfg.objective.beta > 0 or cfg.objective.log_kl
        needs_initial = needs_initial or cfg.model.lora.rank > 0
        try:
            initial, self.warm_info = (
                warmup_stage(plan, run_dir, load, console) if needs_initial else (cfg.model.name_or_path, {})
            )
            self.pol = build_policy(cfg, load, str(self.resume_from) if self.resume_from else initial, initial)
        except UsageError:
            if not resuming:
                _undo_fresh_start(run_dir)  # a model that cannot load leaves no run behind to block a rerun
            raise
        heldout_keys = frozenset(ex.key for ex in plan.heldout)
        self.source = plan.task.train_source(derive_seed(cfg.seed, "rl-data"), heldout_keys)
        try:
            self.bench = open_hook(cfg, run_dir, plan.max_new_tokens)  # eval.benchmarks at every evaluation, or None
        except ValueError as err:
            raise UsageError(str(err).splitlines()[0]) from None
        self.start_step = ckpt.read_state(self.resume_from)["step"] if self.resume_from is not None else 0
        # trained: the last step whose update is done and logged; saved_step: the latest checkpoint's;
        # snapshot: (RNG, data stream) at the start of step snapshot_step, for a checkpoint of the step before.
        self.trained = self.start_step
        self.saved_step = self.start_step if self.resume_from is not None else None
        self.snapshot, self.snapshot_step = None, None
        self.pending: deque = deque()  # batches sampled for later steps (rollout.staleness > 0)
        if resuming and self.resume_from is None:  # stopped before its first checkpoint: start over in place
            self.warn(f"mhpo train: {run_dir} has no complete checkpoint; starting it over from step 0")
            for name in ("metrics.jsonl", "evals.jsonl"):
                (run_dir / name).unlink(missing_ok=True)
        resume_step = self.start_step if resuming else None
        self.logger = RunLogger(run_dir, cfg.train.report_to, to_dict(cfg), resume_step=resume_step)
        self.before: dict = {}
        self.wall_before = 0.0
        self.last_eval: tuple[int, dict] | None = None

    def warn(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def start(self) -> None:
        """Restore a checkpoint's training state (every RNG last), or seed RL and evaluate the
        RL-initial policy."""
        if self.resume_from is not None:
            pol = self.pol
            state = ckpt.restore_training_state(self.resume_from, pol.optimizer, pol.scheduler, warn=self.warn)
            self.source.load_state_dict(state["source"])
            self.pending = from_state(state.get("pending", []), ckpt.load_pending(self.resume_from))
            self.before, self.warm_info, self.wall_before = state["before_rl"], state["warmup"], state["wall_seconds"]
            self.console.print(
                f"[bold]mhpo train[/]: resuming {self.run_dir} from step {self.start_step} ({self.resume_from.name})"
            )
            return
        torch.manual_seed(derive_seed(self.cfg.seed, "rl"))
        self.before = self.evaluate(0, "before")
        if "greedy/accuracy" in self.before:
            self.console.print(accuracy_line("before RL", self.before, self.plan.pass_k), highlight=False)

    def train(self) -> None:
        """The RL steps after the start step, with periodic evaluations and checkpoints."""
        cfg, steps = self.cfg, self.cfg.train.steps
        self.rl_started = True
        with Progress(self.console, cfg.train.progress, steps, self.start_step) as bar:
            for step in range(self.start_step + 1, steps + 1):
                self.snapshot = (ckpt.rng_state(), self.source.state_dict(), list(self.pending))
                self.snapshot_step = step
                ckpt.maybe_fault("step-start", step)
                with contextlib.ExitStack() as held, self.pol.autocast():
                    hold = functools.partial(self.hold, held, step)
                    metrics = rl_step(self.plan, self.pol, self.source, self.pending, step, hold)
                    self.logger.log_step(step, metrics)
                    self.trained = step
                ckpt.maybe_fault("step", step)
                heldout = None
                if cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                    self.last_eval = (step, self.evaluate(step, "periodic"))
                    heldout = self.last_eval[1].get("greedy/accuracy")
                bar(step, metrics, heldout)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < steps:
                    self.save(step)

    def hold(self, held: contextlib.ExitStack, step: int) -> None:
        """Hold interrupts from here (a step's update) until ``held`` closes (the step is logged)."""
        held.enter_context(self.stop.shield())
        ckpt.maybe_fault("update", step)

    def save_on_stop(self) -> Path | None:
        """After Ctrl-C / SIGTERM: a full checkpoint of the last finished step when it has none yet.

        Stopped before a step's update, the RNG and data stream go back to that step's start, so the
        checkpoint equals the one a periodic save would have written; stopped inside the update by a
        second signal, the weights are torn and nothing is saved."""
        torn = self.stop.forced and self.snapshot_step == self.trained + 1
        if not self.rl_started or self.trained in (0, self.saved_step) or torn:
            return None
        if self.snapshot_step == self.trained + 1:  # stopped during a step, before its update
            ckpt.set_rng_state(*self.snapshot[0])
            self.source.load_state_dict(self.snapshot[1])
            self.pending = deque(self.snapshot[2])
        return self.save(self.trained)

    def finish(self) -> tuple[dict, Path | None]:
        """(evaluation after RL, final checkpoint or None; train.final_checkpoint: full | model | none;
        model.lora.merge: the adapters merged into a plain model, kind model)."""
        steps, kind = self.cfg.train.steps, self.cfg.train.final_checkpoint
        kind = "model" if kind != "none" and self.cfg.model.lora.rank > 0 and self.cfg.model.lora.merge else kind
        done = self.last_eval is not None and self.last_eval[0] == steps
        after = self.last_eval[1] if done else self.evaluate(steps, "after")
        final = None
        if kind != "none" and (self.start_step < steps or ckpt.latest_checkpoint(self.ckpt_root) is None):
            final = self.save(steps, kind)
        elif kind != "none" and (self.ckpt_root / ckpt.step_dir_name(steps)).is_dir():
            final = self.ckpt_root / ckpt.step_dir_name(steps)  # written before the run was stopped
        self.logger.flush()
        return after, final

    def close(self) -> None:
        self.logger.close()
        if self.bench is not None:
            self.bench.close()

    def evaluate(self, step: int, stage: str) -> dict:
        """Held-out evaluation (and eval.benchmarks) of the current policy; logged, samples saved."""
        results, records = heldout_results(self.plan, self.pol, self.bench, step)
        if results:
            self.logger.log_eval(step, stage, results)
            save_samples(self.run_dir, step, records)
        return results

    def save(self, step: int, kind: str = "full") -> Path:
        self.logger.flush()
        records, tensors = to_state(self.pending)
        state = {
            "source": self.source.state_dict(),
            "pending": records,
            "before_rl": self.before,
            "warmup": self.warm_info,
            "config_hash": cfg_hash(self.cfg),
            "wall_seconds": self.wall_seconds(),
        }
        pol = self.pol
        with self.stop.shield():
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                step,
                model=self.saved_model(kind),
                tokenizer=pol.processor,
                optimizer=pol.optimizer,
                scheduler=pol.scheduler,
                state=state,
                keep=self.cfg.train.keep_checkpoints,
                kind=kind,
                save_optimizer=self.cfg.train.save_optimizer,
                pending=tensors,
            )
            self.saved_step = step if kind == "full" else self.saved_step
        return path

    def saved_model(self, kind: str):
        """The model a checkpoint of ``kind`` holds: the policy (a LoRA policy's adapters), or with
        model.lora.merge the final (kind model) checkpoint's adapters merged into plain weights."""
        if kind == "model" and self.cfg.model.lora.merge and is_peft(self.pol.model):
            return merged(self.pol.model)
        return self.pol.model

    def wall_seconds(self) -> float:
        """Wall time of the whole run, the stretches before a resume included."""
        return self.wall_before + time.perf_counter() - self.t_start

    def write_summary(self, after: dict, final: Path | None) -> dict:
        plots = []
        if self.cfg.train.plots:
            plots = [str(p) for p in plot_run(self.run_dir)]
        summary = make_summary(
            self.cfg, self.run_dir, self.before, after, self.warm_info, self.wall_seconds(), plots, final
        )
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary
