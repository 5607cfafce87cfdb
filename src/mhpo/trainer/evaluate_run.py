"""Evaluating a training run's checkpoint: `mhpo eval RUN_DIR` (its held-out set) and
`mhpo eval --model RUN_DIR --benchmarks ...` (the benchmark protocol on its checkpoint).

    evaluate_run("runs/addition-mhpo-s0", checkpoint="step_000100", overrides=["eval.pass_k=16"])
        -> RUN_DIR/eval/<checkpoint>.json (results) and <checkpoint>.samples.jsonl (greedy completions)

The checkpoint is verified against its manifest before it loads; the task, model settings and
reward functions are the run's own (only ``eval.*`` keys may be overridden). A LoRA run's checkpoint
(adapters only) loads onto the run's RL-initial policy: its warm-up dir, or model.name_or_path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mhpo.errors import UsageError
from mhpo.evaluation.heldout import evaluate
from mhpo.evaluation.runner import evaluate_benchmarks as evaluate_model
from mhpo.files import atomic_write_json
from mhpo.generation.policy import quiet_transformers
from mhpo.models.lora import adapter_base
from mhpo.seeding import derive_seed
from mhpo.trainer.checkpoint import read_state
from mhpo.trainer.config import Config, ConfigError, check_override, to_dict, with_overrides
from mhpo.trainer.run_dir import CONFIG_FILE, check_intact, is_run_dir, load_run_config, resolve_checkpoint
from mhpo.trainer.setup import Plan, initial_source, model_loader, prepare_run, run_policy


def heldout_results(plan: Plan, policy, bench=None, step: int = 0) -> tuple[dict, list[dict]]:
    """(results, sample records) of ``policy`` under the run's evaluation settings: held-out greedy
    accuracy and pass@k (:func:`mhpo.evaluation.heldout.evaluate`; pass@k sampled with the seed
    derive_seed(eval.seed, "pass@k"), the same at every evaluation), then eval.benchmarks through
    ``bench`` (:func:`mhpo.evaluation.hook.open_hook`) when given."""
    cfg = plan.cfg
    results, records = {}, []
    with policy.autocast():
        if plan.heldout:
            results, records = evaluate(
                policy,
                plan.scorer,
                plan.heldout,
                max_new_tokens=plan.eval_max_new_tokens,
                pass_k=plan.pass_k,
                temperature=cfg.eval.temperature,
                batch_size=cfg.eval.batch_size,
                seed=derive_seed(cfg.eval.seed, "pass@k"),
            )
        if bench is not None:
            results.update(bench(policy.model, policy.tokenizer, policy.encoder, policy.eos_ids, step))
    return results, records


def eval_config(run_dir: Path, overrides) -> Config:
    """The run's config with ``eval.*`` overrides applied (UsageError for any other key)."""
    cfg = load_run_config(run_dir)
    try:
        for text in overrides:
            key = check_override(text)
            if key.split(".")[0] != "eval":
                raise UsageError(f"only eval.* keys can be overridden here, not {key!r}")
        return with_overrides(cfg, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def evaluate_run(run_dir: str | Path, *, checkpoint: str | None = None, overrides=()) -> dict:
    """Evaluate a checkpoint of a run on its held-out set; returns {checkpoint, step, heldout_size,
    eval, results, path} (also written to RUN_DIR/eval/<checkpoint>.json)."""
    run_dir, ckpt = resolve_checkpoint(Path(run_dir), checkpoint)
    check_intact(run_dir, ckpt)
    cfg = eval_config(run_dir, overrides)
    threads = torch.get_num_threads()
    with prepare_run(cfg) as plan:
        if not plan.heldout:
            raise UsageError(
                f"run {str(run_dir)!r} has no held-out set (eval.size=0); give one, e.g. eval.size=100, "
                "or use mhpo eval --model ... --benchmarks ..."
            )
        try:
            torch.set_num_threads(plan.cfg.train.threads)
            quiet_transformers()
            base = initial_source(plan.cfg, run_dir) if adapter_base(ckpt) else None  # a LoRA run's base model
            policy = run_policy(plan.cfg, *model_loader(plan.cfg)(str(ckpt), base=base))
            t0 = time.perf_counter()
            results, records = heldout_results(plan, policy)
            results["time/seconds"] = time.perf_counter() - t0
        except ValueError as err:
            raise UsageError(str(err)) from None
        finally:
            torch.set_num_threads(threads)
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    record = {
        "checkpoint": str(ckpt),
        "step": read_state(ckpt)["step"],
        "heldout_size": len(plan.heldout),
        "eval": to_dict(cfg)["eval"],
        "results": results,
    }
    path = out_dir / f"{ckpt.name}.json"
    atomic_write_json(path, record)
    (out_dir / f"{ckpt.name}.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {**record, "path": str(path)}


def evaluate_benchmarks(model: str, benchmarks, settings, output_dir, *, checkpoint: str | None = None, **kwargs):
    """:func:`mhpo.evaluation.runner.evaluate_benchmarks` where ``model`` may also be a training run's
    directory (its latest checkpoint, or ``checkpoint``; verified first) or one of its checkpoint
    directories: the run's chat template and trust_remote_code apply unless given."""
    if not is_run_dir(model):
        kwargs["chat_template"] = kwargs.get("chat_template") or "auto"
        if checkpoint is not None:
            raise UsageError(f"--checkpoint {checkpoint!r} needs a run directory, and {model!r} is not one")
        return evaluate_model(model, benchmarks, settings, output_dir, **kwargs)
    run_dir, ckpt = resolve_checkpoint(Path(model).expanduser(), checkpoint)
    check_intact(run_dir, ckpt)
    cfg = load_run_config(run_dir) if (run_dir / CONFIG_FILE).is_file() else None
    if cfg is not None:
        if kwargs.get("chat_template") is None:
            kwargs["chat_template"] = cfg.model.chat_template
        kwargs["trust_remote_code"] = kwargs.get("trust_remote_code") or cfg.model.trust_remote_code
    kwargs["chat_template"] = kwargs.get("chat_template") or "auto"
    return evaluate_model(str(ckpt), benchmarks, settings, output_dir, name=model, **kwargs)
