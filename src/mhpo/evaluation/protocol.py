"""The evaluation protocol: K samples per problem, scored, written row by row, summarised.

    settings = Settings(samples=32, temperature=0.6, top_p=0.95, max_new_tokens=2048, seed=0)
    summary = run_protocol(model, processor, {"math500": problems}, settings, "out/", scorer=scorer)

Sampling is :func:`mhpo.generation.rollout.sample` with ``group_size=K``: each prompt is prefilled once and
its KV cache repeated for its K completions, and one generate call takes
``max(1, batch_size // K)`` problems of a benchmark (batches span problems). Temperature
sampling with ``top_p`` and no top-k (``top_k=0``), no other logits processors; temperature 0
means greedy. Batch ``b`` of benchmark ``B`` (problems b*m .. b*m+m-1 of its fixed order) runs
under a private torch RNG seeded with ``derive_seed(seed, "B/b*m")``, so results are a function
of (model, problems, settings) alone: reproducible on CPU, and a resumed run samples exactly what
the uninterrupted one would have (at the same ``batch_size``).

Outputs (``out_dir``):

    samples.jsonl   one row per problem, appended batch by batch (the resume log): benchmark, id,
                    prompt (as rendered for the model), gold, completions [K], answers [K] (the
                    extracted text or null), parsed [K] (the canonical answer, null = no parsable
                    answer), scores [K] in [0, 1], lengths [K] (tokens before EOS), truncated [K]
                    (no EOS within max_new_tokens); with ``greedy``: greedy_completion,
                    greedy_answer, greedy_score
    settings.json   the settings and model of the first run; a rerun with different ones stops
    summary.json    per benchmark and ``macro``, see :func:`mhpo.evaluation.report.summarize`
    summary.md      the paper-shaped table, see :func:`mhpo.evaluation.report.render_markdown`

A rerun skips the problems already in samples.jsonl (a torn last line is ignored and redone).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mhpo.evaluation.answers import MODES
from mhpo.evaluation.loading import DEFAULT_TEMPLATE, Problem
from mhpo.evaluation.metrics import report_ks
from mhpo.evaluation.scoring import AnswerScorer
from mhpo.progress import progress_bar

SAMPLES_FILE, SETTINGS_FILE, SUMMARY_JSON, SUMMARY_MD = "samples.jsonl", "settings.json", "summary.json", "summary.md"


@dataclass(frozen=True)
class Settings:
    """Sampling and scoring settings, recorded in every summary. Defaults: K = 32 and 2048 new
    tokens as in the MHPO paper (Qwen2.5); temperature 0.6 and top-p 0.95 as open-r1 / lighteval
    (the paper does not state its own); the usual boxed-answer instruction."""

    samples: int = 32
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 2048
    seed: int = 0
    system_prompt: str | None = None
    template: str = DEFAULT_TEMPLATE
    answer_extraction: str = "boxed"
    greedy: bool = False
    batch_size: int = 64  # completions per generate call
    pass_k: tuple[int, ...] = ()  # empty: 1, 2, 4, ... and K

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--max-new-tokens and --batch-size must be >= 1")
        if self.answer_extraction not in MODES:
            raise ValueError(f"unknown --answer-extraction {self.answer_extraction!r}; valid: {', '.join(MODES)}")
        report_ks(self.samples, self.pass_k)  # K smaller than a requested pass@k: a clear error

    @property
    def ks(self) -> list[int]:
        return report_ks(self.samples, self.pass_k)

    def record(self) -> dict:
        out = asdict(self)
        out["pass_k"] = self.ks
        out["top_k"] = 0
        out["do_sample"] = self.temperature > 0
        return out


# Settings that change what is sampled or how it is scored: a resumed run must match them.
RESUME_KEYS = (
    "samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "system_prompt",
    "template",
    "answer_extraction",
    "greedy",
    "batch_size",
)


# ---------------------------------------------------------------------------------------------
# Sampling and scoring one batch of problems.


@dataclass
class Generator:
    """What sampling needs: the model, its text tokenizer, the prompt encoder and the EOS ids."""

    model: Any
    tokenizer: Any
    encoder: Any
    eos_ids: list[int]
    autocast: Callable[[], Any] = contextlib.nullcontext  # the precision's autocast context (bf16-mixed)
    stats: dict = field(default_factory=lambda: {"completion_tokens": 0, "generate_seconds": 0.0})


def sample_rows(
    gen: Generator, problems: Sequence[Problem], settings: Settings, scorer: AnswerScorer, seed: int
) -> list[dict]:
    """samples.jsonl rows of ``problems``: K samples each (one generate pass, shared prefill),
    plus the greedy completion when asked, scored in the worker."""
    from mhpo.generation.rollout import sample
    from mhpo.seeding import seeded

    K = settings.samples
    device = next(gen.model.parameters()).device
    examples = [p.example for p in problems]
    prompts = gen.encoder(examples)
    common = dict(max_new_tokens=settings.max_new_tokens, eos_ids=gen.eos_ids, batch_size=settings.batch_size)
    t0 = time.perf_counter()
    greedy = None
    with gen.autocast():
        with seeded(seed, device):
            roll = sample(
                gen.model,
                gen.tokenizer,
                prompts,
                group_size=K,
                do_sample=settings.temperature > 0,
                temperature=settings.temperature or 1.0,
                top_p=settings.top_p,
                top_k=0,
                **common,
            )
        if settings.greedy:
            greedy = sample(gen.model, gen.tokenizer, prompts, group_size=1, do_sample=False, **common)
    gen.stats["generate_seconds"] += time.perf_counter() - t0
    gen.stats["completion_tokens"] += int(roll.lengths.sum()) + (int(greedy.lengths.sum()) if greedy is not None else 0)
    ended = roll.ended(gen.eos_ids)
    lengths = (roll.lengths - ended.long()).tolist()
    golds = [p.gold for p in problems for _ in range(K)]
    choices = [p.choices for p in problems for _ in range(K)]
    judged = scorer.score(roll.completions, golds, choices)
    greedy_judged = (
        scorer.score(greedy.completions, [p.gold for p in problems], [p.choices for p in problems]) if greedy else None
    )
    rows = []
    for i, p in enumerate(problems):
        part = slice(i * K, (i + 1) * K)
        js = judged[part]
        row = {
            "benchmark": p.benchmark,
            "id": p.id,
            "prompt": gen.encoder.render(p.example),
            "gold": p.gold,
            "completions": roll.completions[part],
            "answers": [j.answer for j in js],
            "parsed": [j.parsed for j in js],
            "scores": [j.score for j in js],
            "lengths": lengths[part],
            "truncated": [not bool(e) for e in ended[part].tolist()],
        }
        if p.choices:
            row["choices"] = p.choices
        errors = [j.error for j in js if j.error]
        if errors:
            row["scorer_errors"] = errors
        if greedy_judged is not None:
            g = greedy_judged[i]
            row.update(greedy_completion=greedy.completions[i], greedy_answer=g.answer, greedy_score=g.score)
        rows.append(row)
    return rows


def batches(problems: Sequence[Problem], settings: Settings) -> list[tuple[int, list[Problem]]]:
    """(start index, problems) in fixed order, ``max(1, batch_size // K)`` problems each."""
    per = max(1, settings.batch_size // settings.samples)
    return [(s, list(problems[s : s + per])) for s in range(0, len(problems), per)]


def batch_seed(settings: Settings, benchmark: str, start: int) -> int:
    from mhpo.seeding import derive_seed

    return derive_seed(settings.seed, f"{benchmark}/{start}")


# ---------------------------------------------------------------------------------------------
# The output directory.


def read_rows(path: Path) -> list[dict]:
    """Complete rows of samples.jsonl (a torn last line is skipped); [] when absent."""
    from mhpo.files import read_jsonl

    return read_jsonl(path)


def check_resume(out_dir: Path, record: dict, *, write: bool = True) -> None:
    """Write settings.json on the first run; on a rerun, ValueError naming every setting that
    differs from the recorded one (the samples already written were drawn with those). Sections
    missing from ``record`` (e.g. "model" before it is loaded) are not compared."""
    from mhpo.files import atomic_write_json

    path = Path(out_dir) / SETTINGS_FILE
    if not path.is_file():
        if write:
            atomic_write_json(path, record)
        return
    old = json.loads(path.read_text())
    diffs = []
    for section in ("model", "settings"):
        for key, value in record.get(section, {}).items():
            if section == "settings" and key not in RESUME_KEYS:
                continue
            if section == "model" and key not in ("model", "dtype", "chat_template"):
                continue
            if old.get(section, {}).get(key) != value:
                diffs.append(f"{key}: {old.get(section, {}).get(key)!r} -> {value!r}")
    if diffs:
        raise ValueError(
            f"{out_dir} holds samples drawn with other settings ({'; '.join(diffs)}); "
            "use another --output-dir, or delete it to start over"
        )


def run_protocol(
    gen: Generator,
    problems: Mapping[str, Sequence[Problem]],
    settings: Settings,
    out_dir: str | Path,
    *,
    scorer: AnswerScorer,
    specs: Mapping[str, Any],
    model_info: Mapping[str, Any],
    progress: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Sample, score and write every problem not yet in samples.jsonl, then write the summaries."""
    from mhpo.evaluation.report import render_markdown, summarize
    from mhpo.files import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, {"model": dict(model_info), "settings": settings.record()})
    samples_path = out / SAMPLES_FILE
    existing = read_rows(samples_path)
    done = {(r["benchmark"], r["id"]) for r in existing}
    _drop_torn_line(samples_path)
    todo = [
        (name, start, chunk)
        for name, probs in problems.items()
        for start, chunk in batches(probs, settings)
        if any((name, p.id) not in done for p in chunk)
    ]
    remaining = sum(sum((name, p.id) not in done for p in chunk) for name, _, chunk in todo)
    skipped = sum(len(v) for v in problems.values()) - remaining
    if skipped:
        log(f"resuming: {skipped} problem(s) already in {samples_path}")
    t0 = time.perf_counter()
    with _Progress(progress, remaining) as bar, open(samples_path, "a", buffering=1) as fh:
        for name, start, chunk in todo:
            bar.describe(name)
            rows = sample_rows(gen, chunk, settings, scorer, batch_seed(settings, name, start))
            new = [r for r in rows if (name, r["id"]) not in done]
            for r in new:
                fh.write(json.dumps(r) + "\n")
                done.add((name, r["id"]))
            existing.extend(new)
            bar.advance(len(new), gen.stats)
    wall = time.perf_counter() - t0
    wanted = {name: {p.id for p in probs} for name, probs in problems.items()}
    by_bench = {name: [r for r in existing if r["benchmark"] == name and r["id"] in wanted[name]] for name in problems}
    summary = summarize(
        by_bench,
        specs,
        settings,
        model_info,
        run={
            "seconds_this_run": wall,
            **gen.stats,
            "scorer_errors": scorer.errors,
            "scorer_timeouts": scorer.timeouts,
            "resumed_problems": skipped,
        },
    )
    atomic_write_json(out / SUMMARY_JSON, summary)
    atomic_write_text(out / SUMMARY_MD, render_markdown(summary))
    return summary


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a run killed mid-write) so appends start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as fh:
            fh.truncate(cut)


class _Progress:
    """A rich progress bar over problems with tokens/s and ETA (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled and total > 0, total
        self._progress = self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console

            self._progress = progress_bar(
                "[bold]{task.description}", "{task.fields[speed]}", console=Console(stderr=True)
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("eval", total=self.total, speed="")
        return self

    def describe(self, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=name)

    def advance(self, n: int, stats: Mapping[str, float]) -> None:
        if self._progress is not None:
            secs = stats["generate_seconds"]
            speed = f"{stats['completion_tokens'] / secs:,.0f} tok/s" if secs > 0 else ""
            self._progress.update(self._task, advance=n, speed=speed)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
