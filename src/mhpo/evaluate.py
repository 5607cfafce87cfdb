"""`mhpo eval DIR`: evaluate a run's checkpoint on the run's held-out set.

    mhpo eval runs/addition-mhpo-s0-...                    # latest checkpoint
    mhpo eval runs/... --checkpoint step_000100 eval.pass_k=16 eval.size=500

Writes ``DIR/eval/<checkpoint>.json`` (results) and ``DIR/eval/<checkpoint>.samples.jsonl``
(greedy completions) and prints the results. Only ``eval.*`` keys may be overridden: the task, the
model and the reward functions are the run's own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .cli import UsageError


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="a run directory (or one of its checkpoint directories)")
    parser.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE", help="evaluation overrides, e.g. eval.pass_k=16")
    parser.add_argument("--checkpoint", metavar="NAME", help="checkpoint name (step_000250) or path; default: the latest")


def run(args) -> int:
    results = evaluate_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
    print(f"mhpo eval: {results['checkpoint']} (step {results['step']}) on {results['heldout_size']} held-out problems")
    for key, value in results["results"].items():
        print(f"  {key:<18} {value:.4f}" if isinstance(value, float) else f"  {key:<18} {value}")
    print(f"  written to {results['path']}")
    return 0


def resolve_checkpoint(run_dir: Path, checkpoint: str | None) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) from a run dir or a checkpoint dir, and an optional name/path."""
    from .checkpoint import STATE_FILE, latest_checkpoint

    run_dir = Path(run_dir)
    if (run_dir / STATE_FILE).is_file():  # a checkpoint dir was given
        return run_dir.parent.parent, run_dir
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a directory")
    if checkpoint is None:
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            raise UsageError(f"{str(run_dir)!r} has no complete checkpoint")
        return run_dir, found
    path = Path(checkpoint)
    if not path.is_dir():
        path = run_dir / "checkpoints" / checkpoint
    if not (path / STATE_FILE).is_file():
        from .checkpoint import complete_checkpoints

        names = [d.name for _, d in complete_checkpoints(run_dir / "checkpoints")]
        raise UsageError(f"no complete checkpoint {checkpoint!r} in {str(run_dir)!r}; available: {', '.join(names) or 'none'}")
    return run_dir, path


def evaluate_run(run_dir: str | Path, *, checkpoint: str | None = None, overrides=()) -> dict:
    """Evaluate a checkpoint of a run; returns {checkpoint, step, heldout_size, results, path}."""
    import dataclasses

    import torch

    from .checkpoint import atomic_write_json, read_state
    from .config import ConfigError, from_dict, parse_override, set_dotted, to_dict
    from .evaluation import evaluate
    from .models import load_pretrained, resolve_device, resolve_dtype
    from .multimodal import text_tokenizer
    from .rollout import build_encoder, eos_token_ids
    from .seeding import derive_seed
    from .train import default_threads, load_run_config, validate

    run_dir, ckpt = resolve_checkpoint(Path(run_dir), checkpoint)
    cfg = load_run_config(run_dir)
    tree = to_dict(cfg)
    try:
        for text in overrides:
            keys, value = parse_override(text)
            if keys[0] != "eval":
                raise UsageError(f"only eval.* keys can be overridden here, not {'.'.join(keys)!r}")
            set_dotted(tree, keys, value)
        cfg = from_dict(tree)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    plan = validate(dataclasses.replace(cfg))
    try:
        torch.set_num_threads(cfg.train.threads or default_threads(cfg))
        device = resolve_device(cfg.model.device)
        # A vision-language checkpoint loads with its processor: the encoder takes the processor
        # (prompts with pixels), decoding and the EOS ids the processor's text tokenizer.
        model, processor = load_pretrained(str(ckpt), dtype=resolve_dtype(cfg.model.dtype, device), device=device,
                                           trust_remote_code=cfg.model.trust_remote_code)
        encoder = build_encoder(processor, chat_template=cfg.model.chat_template, system_prompt=cfg.task.system_prompt)
        tokenizer = text_tokenizer(processor)
        t0 = time.perf_counter()
        results, records = evaluate(
            model, tokenizer, encoder, plan.scorer, plan.heldout, max_new_tokens=plan.max_new_tokens,
            eos_ids=eos_token_ids(model, tokenizer), pass_k=cfg.eval.pass_k, temperature=cfg.eval.temperature,
            batch_size=cfg.eval.batch_size, seed=derive_seed(cfg.eval.seed, "pass@k"),
        )
        results["time/seconds"] = time.perf_counter() - t0
    finally:
        plan.scorer.close()
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    step = read_state(ckpt)["step"]
    record = {"checkpoint": str(ckpt), "step": step, "heldout_size": len(plan.heldout), "eval": to_dict(cfg)["eval"], "results": results}
    path = out_dir / f"{ckpt.name}.json"
    atomic_write_json(path, record)
    (out_dir / f"{ckpt.name}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {**record, "path": str(path)}
