"""What a run will use: the config's ``null`` / ``auto`` / ``0`` settings resolved for its model,
task and machine. The resolved config is what ``mhpo train --print-config`` shows, what the run
directory's config.yaml records and what a resume reads back.

    key                   unset   resolved to
    optim.lr              null    2e-4 for the built-in tiny models (measured on the demo: 1e-4 and 2e-4
                                  learn, 4e-4 is unstable), 1e-6 for a pretrained model: the default of
                                  TRL's GRPOConfig and of verl's actor, where practitioners start
                                  full-parameter RL (on SmolLM2-135M lr 1e-4 collapsed every objective
                                  within 12 steps: docs/evidence.md)
    rollout.max_new_tokens null   the task's budget (a dataset task: 256, TRL's max_completion_length)
    eval.size, eval.pass_k null   200 and 8 for the built-in tiny models, 32 and 0 for a pretrained model
    eval.max_new_tokens   null    the rollout's
    model.dtype           auto    the precision this machine gives (mhpo.models.device.resolve_precision)
    train.threads         0       1 for the built-in tiny models, else the usable cores up to 8
    rollout.behaviour_logprobs auto  sampler where sampler and trainer both run float32, else trainer
    rollout.log_mismatch  null    on with sampler log-probs unless both run float32 (:func:`behaviour_source`)
"""

from __future__ import annotations

import dataclasses

from mhpo.models.device import resolve_device, resolve_precision, usable_cores
from mhpo.models.sources import BUILT_IN
from mhpo.trainer.config import Config

# Per kind of model: (lr, held-out size, pass@k). See the module docstring for where they come from.
KIND_DEFAULTS = {"built-in": (2e-4, 200, 8), "pretrained": (1e-6, 32, 0)}
# The value of each key above that means "resolve me" (a resume keeps the run's resolved value there).
UNSET = {
    "optim.lr": None,
    "rollout.max_new_tokens": None,
    "eval.size": None,
    "eval.pass_k": None,
    "eval.max_new_tokens": None,
    "model.dtype": "auto",
    "train.threads": 0,
    "rollout.behaviour_logprobs": "auto",
    "rollout.log_mismatch": None,
}
# An lr at or above this on a pretrained model is a tiny-model lr: warned about loudly.
TOY_LR = 1e-4


def model_kind(cfg: Config) -> str:
    """'built-in' (the tiny models built locally, random init) or 'pretrained'."""
    return "built-in" if cfg.model.name_or_path in BUILT_IN else "pretrained"


def default_threads(cfg: Config) -> int:
    """1 for the built-in tiny models (their matrices are too small to split: with 2 threads on 2
    busy cores a step measured ~30x slower than with 1); otherwise the usable cores, at most 8."""
    if model_kind(cfg) == "built-in":
        return 1
    return max(1, min(usable_cores(), 8))


def resolve_defaults(cfg: Config, task_max_new_tokens: int | None) -> Config:
    """``cfg`` with every setting of the table above made concrete (set values are kept).

    ``task_max_new_tokens``: the task's completion budget (None leaves rollout.max_new_tokens as it is)."""
    lr, size, pass_k = KIND_DEFAULTS[model_kind(cfg)]
    rollout_tokens = cfg.rollout.max_new_tokens or task_max_new_tokens
    precision = resolve_precision(
        cfg.model.dtype, resolve_device(cfg.model.device), built_in=model_kind(cfg) == "built-in"
    )
    r = dataclasses.replace
    return r(
        cfg,
        model=r(cfg.model, dtype=precision.name),
        rollout=r(cfg.rollout, max_new_tokens=rollout_tokens, **behaviour_source(cfg.rollout, precision.name)),
        optim=r(cfg.optim, lr=lr if cfg.optim.lr is None else cfg.optim.lr),
        eval=r(
            cfg.eval,
            size=size if cfg.eval.size is None else cfg.eval.size,
            pass_k=pass_k if cfg.eval.pass_k is None else cfg.eval.pass_k,
            max_new_tokens=cfg.eval.max_new_tokens or rollout_tokens,
        ),
        train=r(cfg.train, threads=cfg.train.threads or default_threads(cfg)),
    )


def behaviour_source(rollout, precision: str) -> dict:
    """rollout.behaviour_logprobs = auto, made concrete: ``sampler`` when the sampler and the trainer both
    run in float32 (run precision float32, rollout.precision same or float32), ``trainer`` otherwise;
    rollout.log_mismatch = null: on with sampler log-probs unless both run float32.

    Measured on SmolLM2-135M-Instruct (8 chat_addition prompts x 4, <= 64 tokens, 2-core AMD EPYC): in
    float32 the sampler's log-probs are the trainer's up to rounding (|difference| mean 2.8e-6, max
    2.7e-5 over 1,373 tokens), and taking them saves the trainer's no-grad pass (2.4-2.5 s of a 28.8 s
    RL step); the mismatch is then not logged (there is none to measure). Under bf16 autocast the
    KV-cached decode and the trainer's full forward round differently (mean 0.028 nats, p99 0.13, max
    0.27 over 1,520 tokens): a p99 near PPO's 0.2 clip range, so the trainer recomputes them there.
    Set values are kept."""
    both_float32 = precision == "float32" and rollout.precision in ("same", "float32")
    source = rollout.behaviour_logprobs
    if source == "auto":
        source = "sampler" if both_float32 else "trainer"
    log = rollout.log_mismatch if rollout.log_mismatch is not None else source == "sampler" and not both_float32
    return {"behaviour_logprobs": source, "log_mismatch": log}


def config_warnings(cfg: Config) -> list[str]:
    """Settings that run but are likely a mistake: a tiny-model learning rate on a pretrained model
    (full-parameter RL), bf16 sampling on a CPU without native bf16 matmuls (~100x slower)."""
    from mhpo.models.device import cpu_has_bf16

    out = []
    if model_kind(cfg) == "pretrained" and cfg.optim.lr is not None and cfg.optim.lr >= TOY_LR:
        out.append(
            f"optim.lr={cfg.optim.lr:g} is a tiny-model learning rate: full-parameter RL of a pretrained model "
            "starts around 1e-6 (TRL's and verl's default; mhpo's default for pretrained models); on SmolLM2-135M "
            "lr 1e-4 collapsed every objective within 12 steps (docs/evidence.md)"
        )
    if cfg.rollout.precision == "bf16" and resolve_device(cfg.model.device).type == "cpu" and not cpu_has_bf16():
        out.append("rollout.precision=bf16 on a CPU without native bf16 matmuls: sampling will be ~100x slower")
    return out


def resolved_for_display(cfg: Config) -> Config:
    """``cfg`` resolved as a run would resolve it (for ``--print-config``); the task's token budget
    stays null when the task cannot be built here (e.g. a dataset file that is not there yet)."""
    from mhpo.tasks import build_task

    try:
        budget = build_task(cfg.task).max_new_tokens
    except (ValueError, TypeError, ImportError, OSError):
        budget = None
    return resolve_defaults(cfg, budget)
