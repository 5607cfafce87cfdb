"""One call for a whole evaluation: load the model, the benchmarks and the scorer, run the protocol.

    summary = evaluate_benchmarks("runs/a", ["math500", "aime24"], Settings(samples=32), "out/")

``model`` is a run directory (its latest checkpoint, or ``checkpoint=``), a checkpoint directory,
or anything :func:`mhpo.models.loading.load_pretrained` takes (a model directory, a hub id, a ``.gguf``
file, a named model), loaded with :func:`mhpo.models.resolve_device` / ``resolve_precision``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from mhpo.benchmarks.loading import Problem, load_problems
from mhpo.benchmarks.protocol import Generator, Settings, check_resume, run_protocol
from mhpo.benchmarks.scoring import AnswerScorer
from mhpo.benchmarks.specs import BenchmarkSpec, get_spec


def resolve_model_source(source: str, checkpoint: str | None = None) -> tuple[str, dict]:
    """(path to load, run-config model settings): a run dir -> its latest (or named) checkpoint
    and its config's chat_template / trust_remote_code; anything else as given."""
    from mhpo.trainer.checkpoint import STATE_FILE, latest_checkpoint

    p = Path(source).expanduser()
    run_dir = None
    if (p / STATE_FILE).is_file():
        run_dir, ckpt = p.parent.parent, p
    elif p.is_dir() and (p / "checkpoints").is_dir():
        run_dir = p
        ckpt = (p / "checkpoints" / checkpoint) if checkpoint else latest_checkpoint(p / "checkpoints")
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            raise ValueError(
                f"run directory {source!r} has no complete checkpoint{f' {checkpoint!r}' if checkpoint else ''}"
            )
    else:
        return source, {}
    extra = {}
    if (run_dir / "config.yaml").is_file():
        from mhpo.trainer.config import load_config

        cfg = load_config(run_dir / "config.yaml")
        extra = {"chat_template": cfg.model.chat_template, "trust_remote_code": cfg.model.trust_remote_code}
    return str(ckpt), extra


def load_eval_model(
    source: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    checkpoint: str | None = None,
    system_prompt: str | None = None,
    log: Callable[[str], None] | None = None,
):
    """(Generator, model info) for ``source``; ValueError (one line) when it cannot be loaded.
    ``dtype`` is model.dtype's (auto | float32 | bfloat16 | float16 | bf16-mixed)."""
    from transformers.utils import logging as hf_logging

    from mhpo.models import resolve_device, resolve_precision
    from mhpo.models.loading import load_pretrained
    from mhpo.models.multimodal import text_tokenizer
    from mhpo.trainer.rollout import build_encoder, eos_token_ids

    hf_logging.disable_progress_bar()  # no per-file loading bars next to ours
    path, run_cfg = resolve_model_source(source, checkpoint)
    dev = resolve_device(device)
    precision = resolve_precision(dtype, dev)  # weights' dtype, and bf16 autocast for bf16-mixed
    trust = trust_remote_code or run_cfg.get("trust_remote_code", False)
    try:
        model, processor = load_pretrained(path, dtype=precision.weights, device=dev, trust_remote_code=trust, log=log)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(
            f"model {source!r} could not be loaded: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from None
    model.eval()
    mode = chat_template or run_cfg.get("chat_template", "auto")
    encoder = build_encoder(processor, chat_template=mode, system_prompt=system_prompt)
    tokenizer = text_tokenizer(processor)
    info = {
        "model": source,
        "path": path,
        "dtype": precision.name,
        "device": str(dev),
        "chat_template": bool(encoder.chat),
        "vision": getattr(processor, "image_processor", None) is not None,
    }
    gen = Generator(model, tokenizer, encoder, eos_token_ids(model, tokenizer), autocast=lambda: precision.context(dev))
    return gen, info


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


def check_modality(specs: dict[str, BenchmarkSpec], problems: dict[str, list[Problem]], vision: bool) -> None:
    """ValueError when a benchmark with images meets a text-only model."""
    for name, probs in problems.items():
        if not vision and any(p.example.columns.get("image") is not None for p in probs[:1]):
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
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    checkpoint: str | None = None,
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
            checkpoint=checkpoint,
            system_prompt=settings.system_prompt,
            log=log,
        )
        check_modality(specs, problems, info["vision"])
        scorer.check()
        log(
            f"mhpo eval: {model} ({info['dtype']}, {info['device']}) on "
            + ", ".join(f"{n} ({len(p)})" for n, p in problems.items())
            + f", {settings.samples} samples each"
        )
        return run_protocol(
            gen, problems, settings, output_dir, scorer=scorer, specs=specs, model_info=info, progress=progress, log=log
        )
    finally:
        scorer.close()
