"""One call for a whole evaluation: load the model, the benchmarks and the scorer, run the protocol.

    summary = evaluate_benchmarks("runs/a", ["math500", "aime24"], Settings(samples=32), "out/")

``model`` is anything :func:`mhpo.generation.policy.load_policy` takes (a model or checkpoint
directory, a hub id, a ``.gguf`` file, a named model). A training run's directory is resolved to
its checkpoint by :func:`mhpo.trainer.evaluate_run.evaluate_benchmarks`, which then calls this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from mhpo.evaluation.loading import Problem, load_problems
from mhpo.evaluation.protocol import Generator, Settings, check_resume, run_protocol
from mhpo.evaluation.scoring import AnswerScorer
from mhpo.evaluation.specs import BenchmarkSpec, get_spec
from mhpo.generation.policy import load_policy, quiet_transformers
from mhpo.models.device import resolve_device, resolve_precision
from mhpo.models.multimodal import has_images


def load_eval_model(
    source: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    chat_template: str = "auto",
    trust_remote_code: bool = False,
    system_prompt: str | None = None,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
):
    """(Generator, model info) for ``source`` (a path or anything :func:`mhpo.generation.policy.load_policy`
    takes; ``name``: how it is reported, default ``source``); ValueError (one line) when it cannot be
    loaded. ``dtype`` is model.dtype's (auto | float32 | bfloat16 | float16 | bf16-mixed)."""
    quiet_transformers()  # no per-file loading bars next to ours
    dev = resolve_device(device)
    precision = resolve_precision(dtype, dev)  # weights' dtype, and bf16 autocast for bf16-mixed
    policy = load_policy(
        source,
        precision=precision,
        device=dev,
        chat_template=chat_template,
        system_prompt=system_prompt,
        trust_remote_code=trust_remote_code,
        log=log,
    )
    policy.model.eval()
    info = {
        "model": name or source,
        "path": source,
        "dtype": precision.name,
        "device": str(dev),
        "chat_template": bool(policy.encoder.chat),
        "vision": policy.vision,
    }
    return Generator(policy.model, policy.tokenizer, policy.encoder, policy.eos_ids, autocast=policy.autocast), info


def load_benchmarks(
    names: Sequence[str],
    *,
    template: str,
    data_dir: str | None = None,
    limit: int | None = None,
    columns: dict | None = None,
    split: str | None = None,
) -> tuple[dict[str, BenchmarkSpec], dict[str, list[Problem]]]:
    """(specs, problems) per benchmark name or local path (names checked first, then loaded)."""
    specs = {}
    for name in names:
        spec = get_spec(name, columns=columns, split=split)
        if spec.name in specs:
            raise ValueError(f"two benchmarks are named {spec.name!r}; rename one of the files")
        specs[spec.name] = spec
    problems = {n: load_problems(s, template=template, data_dir=data_dir, limit=limit) for n, s in specs.items()}
    return specs, problems


def check_modality(problems: dict[str, list[Problem]], vision: bool) -> None:
    """ValueError when a benchmark with images meets a text-only model."""
    for name, probs in problems.items():
        if not vision and has_images(p.example for p in probs[:1]):
            raise ValueError(f"benchmark {name!r} has images but the model is text-only (use a vision-language model)")


def evaluate_benchmarks(
    model: str,
    benchmarks: Sequence[str],
    settings: Settings,
    output_dir: str | Path,
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    columns: dict | None = None,
    split: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    chat_template: str = "auto",
    trust_remote_code: bool = False,
    name: str | None = None,
    score_timeout_s: float = 10.0,
    progress: bool = True,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Everything of ``mhpo eval --model M --benchmarks ...``: returns the summary dict."""
    specs, problems = load_benchmarks(
        benchmarks, template=settings.template, data_dir=data_dir, limit=limit, columns=columns, split=split
    )
    check_resume(Path(output_dir), {"settings": settings.record()}, write=False)  # before loading the model
    scorer = AnswerScorer(settings.answer_extraction, score_timeout_s)
    try:
        gen, info = load_eval_model(
            model,
            dtype=dtype,
            device=device,
            chat_template=chat_template,
            trust_remote_code=trust_remote_code,
            system_prompt=settings.system_prompt,
            name=name,
            log=log,
        )
        check_modality(problems, info["vision"])
        scorer.check()
        log(
            f"mhpo eval: {info['model']} ({info['dtype']}, {info['device']}) on "
            + ", ".join(f"{n} ({len(p)})" for n, p in problems.items())
            + f", {settings.samples} samples each"
        )
        return run_protocol(
            gen, problems, settings, output_dir, scorer=scorer, specs=specs, model_info=info, progress=progress, log=log
        )
    finally:
        scorer.close()
