"""`mhpo train --engine trl`: one mhpo run config, trained by TRL (:class:`mhpo.integrations.trl.MHPOTrainer`).

    torchrun --nproc_per_node 4 -m mhpo.cli train --engine trl --config run.yaml
    accelerate launch -m mhpo.cli train --engine trl --config run.yaml

The config is validated, resolved and its task, held-out set, reward functions, model and warm-up
built exactly as ``mhpo train`` builds them (:mod:`mhpo.trainer.setup`); TRL then runs the RL steps.
What carries over (:func:`trl_args`, with R = rollout.prompts_per_step x rollout.group_size rows per
RL step, W processes, k = update.num_minibatches x update.epochs optimizer steps per RL step):

    model, tokenizer, chat template, system prompt     loaded by mhpo (tiny models seeded the same way)
    task, held-out exclusion, prompt order             the RL steps' prompts, in mhpo's order, shuffle off
    rewards.functions / weights / timeout / budget     reward_funcs (one per function, run in mhpo's
                                                       timeout worker) + reward_weights
    objective.name / hparams / agg / beta              objective, objective_hparams, loss_agg_mode, beta
    advantage.estimator grpo | dr_grpo                 scale_rewards group | none (eps 1e-4: TRL's constant)
    rollout.group_size, max_new_tokens, temperature,   num_generations, max_completion_length,
      top_p, top_k                                     temperature, top_p, top_k
    update.num_minibatches, micro_batch_size, epochs   per_device_train_batch_size = micro (default R / nm / W),
                                                       gradient_accumulation_steps = R / nm / W / micro,
                                                       steps_per_generation = nm x that, num_iterations = epochs
    update.max_grad_norm, optim.*                      max_grad_norm, AdamW (adamw_torch) lr / betas / eps /
                                                       weight decay; warm-up and schedule in optimizer steps
                                                       (x k), transformers' schedules
    train.steps                                        max_steps = train.steps x k (one generation per RL step)
    seed, model.dtype, model.device, train.threads     seed; bf16 for bfloat16 / bf16-mixed; use_cpu on a CPU
    train.report_to, checkpoint_every, keep_checkpoints,
      save_optimizer                                   report_to, save_steps (x k), save_total_limit,
                                                       save_only_model (TRL's resumable checkpoints in
                                                       <run>/trl/, also at the last step when checkpoint_every > 0)
    eval.*                                             mhpo's held-out evaluation (greedy, pass@k) and
                                                       eval.benchmarks before RL, every eval.every RL steps
                                                       and after RL, on process 0

The run directory has mhpo's layout: config.yaml, metrics.jsonl (one line per RL step: TRL's logged
keys, renamed to mhpo's where mhpo has the metric, :data:`METRIC_NAMES`), evals.jsonl, samples/,
plots/, checkpoints/step_N (the final model, kind "model": ``mhpo eval RUN_DIR`` reads it) and
summary.json (``"engine": "trl"``, the weights' fingerprint on every process); TRL's own outputs
(periodic checkpoints, tensorboard runs/) are under <run>/trl/.

What does not carry over (UsageError naming the key and the values that do):

- rollout.staleness > 0 (TRL samples with the current weights), rollout.behaviour_logprobs=sampler
  (TRL has sampler log-probs only with vLLM), rollout.precision other than same (TRL samples at the
  training precision);
- advantage.eps other than 1e-4 (TRL's constant) and advantage.drop_zero_std=true;
- objective.log_kl=true with objective.beta=0 (TRL computes the KL only when beta > 0);
- vision-language models and tasks with images (model tiny-vlm, image tasks): TRL trains VLMs, but
  mhpo's image prompts are not mapped to TRL's multimodal format here;
- train.steps=0 (nothing for TRL to run) and --resume (resuming from TRL's checkpoints is not wired);
- update.micro_batch_tokens (TRL's micro-batches are a fixed number of rows: update.micro_batch_size);
- update.minibatch_order=groups (TRL shuffles rows into minibatches one by one);
- a rollout batch TRL cannot split evenly: R must be divisible by update.num_minibatches, that by W,
  and that by update.micro_batch_size (mhpo's own trainer allows uneven minibatches).

Approximations (no error): transformers' lr schedules step per optimizer step and warm up from 0
(mhpo's step per RL step and warm up from lr / warmup_steps; a linear decay to min_lr_ratio > 0 is
transformers' warmup_stable_decay, whose warm-up starts at min_lr_ratio x lr); ``grad_norm`` is the
last optimizer step's of each RL step (mhpo: the mean) and ``lr`` the rate after it;
train.final_checkpoint=full writes the model checkpoint only (``mhpo train --resume`` cannot continue
a TRL run); rollout.batch_size is ignored (TRL generates each process's share in one call); TRL
splits a generation batch into minibatches once per generation (mhpo: once per epoch). Reward
functions get ``trainer_state=None``, as under ``mhpo train``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from mhpo.errors import UsageError
from mhpo.files import atomic_write_json, atomic_write_text
from mhpo.seeding import derive_seed

# Every mhpo.trainer piece this engine reuses (re-point these when the trainer modules move).
from mhpo.trainer.checkpoint import save_checkpoint
from mhpo.trainer.config import Config, to_yaml
from mhpo.trainer.defaults import config_warnings, resolve_defaults
from mhpo.trainer.plots import plot_run
from mhpo.trainer.run_dir import CHECKPOINTS, CONFIG_FILE, SUMMARY_FILE, config_header, make_summary, save_samples
from mhpo.trainer.setup import model_loader, prepare_run, run_policy, warmup_stage

__all__ = ["METRIC_NAMES", "check_carries", "mhpo_metrics", "run_trl", "trl_args", "trl_dataset", "trl_rewards"]

TRL_DIR = "trl"  # TRL's output_dir inside the run directory
ADVANTAGE_EPS = 1e-4  # TRL 1.16's constant in (R - mean) / (std + eps)
METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.jsonl"
ENGINE_HEADER = "# Trained with mhpo train --engine trl (mhpo.engines.trl).\n"

# TRL's logged key -> mhpo's metrics.jsonl key (objective/<k> -> policy/<k> and rewards/<f>/mean ->
# reward/<f> are renamed by rule in :func:`mhpo_metrics`).
METRIC_NAMES = {
    "reward": "reward/mean",
    "reward_std": "reward/std",
    "loss": "policy/loss",
    "grad_norm": "grad_norm",
    "learning_rate": "lr",
    "kl": "policy/kl",
    "entropy": "entropy",
    "completions/mean_length": "response_length/mean",
    "completions/max_length": "response_length/max",
    "completions/clipped_ratio": "response/truncated_frac",
    "frac_reward_zero_std": "groups/zero_std_frac",
}


# ---------------------------------------------------------------------------------------------
# The mapping (pure: no model, no process group).


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fail(key: str, value, valid: str, why: str) -> UsageError:
    return UsageError(f"--engine trl: {key}={value!r} does not carry over to TRL ({why}); valid: {valid}")


def check_carries(cfg: Config, num_processes: int | None = None) -> None:
    """UsageError naming the first setting of ``cfg`` that TRL cannot run (see the module docstring)."""
    from mhpo.models.sources import TINY_VLM

    r, a, o = cfg.rollout, cfg.advantage, cfg.objective
    if r.staleness > 0:
        raise _fail("rollout.staleness", r.staleness, "0", "TRL samples every batch with the current weights")
    if r.behaviour_logprobs == "sampler":
        raise _fail(
            "rollout.behaviour_logprobs", r.behaviour_logprobs, "trainer", "TRL takes sampler log-probs only from vLLM"
        )
    if r.precision != "same":
        raise _fail("rollout.precision", r.precision, "same", "TRL samples at the training precision")
    if a.eps != ADVANTAGE_EPS:
        raise _fail("advantage.eps", a.eps, f"{ADVANTAGE_EPS:g}", "TRL's std floor is a constant")
    if a.drop_zero_std:
        raise _fail("advantage.drop_zero_std", True, "false", "TRL keeps zero-std groups in the update")
    if o.log_kl and o.beta == 0:
        raise _fail("objective.log_kl", True, "false (or objective.beta > 0)", "TRL computes the KL only when beta > 0")
    if cfg.model.name_or_path == TINY_VLM:
        raise _fail("model.name_or_path", TINY_VLM, "a text model (tiny, a name, a path)", "VLMs are not wired here")
    if cfg.model.lora.rank > 0:
        raise _fail("model.lora.rank", cfg.model.lora.rank, "0", "LoRA is wired into mhpo's own trainer only")
    if cfg.model.gradient_checkpointing:
        raise _fail("model.gradient_checkpointing", True, "false", "use TRL's own gradient_checkpointing")
    if cfg.train.steps == 0:
        raise _fail("train.steps", 0, ">= 1", "nothing for TRL to run; evaluate with mhpo eval")
    if cfg.update.minibatch_order != "rows":
        raise _fail(
            "update.minibatch_order",
            cfg.update.minibatch_order,
            "rows",
            "TRL shuffles rows into minibatches one by one",
        )
    if cfg.update.micro_batch_tokens is not None:
        raise _fail(
            "update.micro_batch_tokens",
            cfg.update.micro_batch_tokens,
            "null (and update.micro_batch_size for the rows)",
            "TRL's micro-batches are a fixed number of rows",
        )
    _batch_shape(cfg, _world_size() if num_processes is None else num_processes)


def _batch_shape(cfg: Config, world: int) -> tuple[int, int, int]:
    """(per-device micro-batch, gradient-accumulation steps, steps per generation); UsageError when the
    rollout batch does not split evenly into minibatches, processes and micro-batches."""
    r, u = cfg.rollout, cfg.update
    rows = r.prompts_per_step * r.group_size
    if rows % u.num_minibatches:
        raise _fail(
            "update.num_minibatches",
            u.num_minibatches,
            f"a divisor of rollout.prompts_per_step x rollout.group_size = {rows}",
            "TRL's minibatches are equal",
        )
    minibatch = rows // u.num_minibatches
    if minibatch % world:
        raise _fail(
            "update.num_minibatches",
            u.num_minibatches,
            f"one that leaves a multiple of the {world} processes in each of the {rows} rows' minibatches",
            f"a minibatch of {minibatch} rows does not split over {world} processes",
        )
    share = minibatch // world
    micro = u.micro_batch_size or share
    if share % micro:
        raise _fail(
            "update.micro_batch_size",
            micro,
            f"a divisor of {share} (the rows of one minibatch on one process) or null",
            "TRL accumulates equal micro-batches",
        )
    accumulation = share // micro
    return micro, accumulation, u.num_minibatches * accumulation


def _schedule(optim, total: int, per_step: int) -> dict[str, Any]:
    """transformers' lr schedule closest to mhpo's (module docstring: approximations), in optimizer steps."""
    warmup = optim.warmup_steps * per_step
    if optim.schedule == "constant":
        return {"lr_scheduler_type": "constant_with_warmup" if warmup else "constant", "warmup_steps": warmup}
    if optim.schedule == "cosine":
        kwargs = {"min_lr_rate": optim.min_lr_ratio}
        return {"lr_scheduler_type": "cosine_with_min_lr", "warmup_steps": warmup, "lr_scheduler_kwargs": kwargs}
    if optim.min_lr_ratio == 0:
        return {"lr_scheduler_type": "linear", "warmup_steps": warmup}
    decay = {
        "num_decay_steps": max(total - warmup, 1),  # no stable phase
        "decay_type": "linear",
        "min_lr_ratio": optim.min_lr_ratio,
    }
    return {"lr_scheduler_type": "warmup_stable_decay", "warmup_steps": warmup, "lr_scheduler_kwargs": decay}


def trainer_logprobs(cfg: Config) -> Config:
    """rollout.behaviour_logprobs=auto is ``trainer`` here: TRL recomputes the old log-probs."""
    if cfg.rollout.behaviour_logprobs != "auto":
        return cfg
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, behaviour_logprobs="trainer"))


def _resolved(cfg: Config) -> Config:
    """``cfg`` with its unset (null / auto) values resolved as ``mhpo train`` resolves them."""
    if cfg.optim.lr is not None and cfg.rollout.max_new_tokens is not None and cfg.model.dtype != "auto":
        return cfg
    from mhpo.tasks import build_task

    try:
        budget = build_task(cfg.task).max_new_tokens
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    return resolve_defaults(cfg, budget)


def trl_args(cfg: Config, output_dir, *, num_processes: int | None = None) -> dict[str, Any]:
    """The :class:`mhpo.integrations.trl.MHPOConfig` keyword arguments that run ``cfg`` (see the module
    docstring), for ``num_processes`` processes (default: $WORLD_SIZE, else 1). Unset values of ``cfg``
    are resolved first. UsageError for a setting that does not carry over."""
    import torch

    from mhpo.models.device import resolve_device

    world = _world_size() if num_processes is None else num_processes
    check_carries(cfg, world)
    cfg = _resolved(trainer_logprobs(cfg))
    micro, accumulation, per_generation = _batch_shape(cfg, world)
    r, o, u, opt, t = cfg.rollout, cfg.objective, cfg.update, cfg.optim, cfg.train
    per_step = u.num_minibatches * u.epochs  # optimizer steps per RL step
    total = t.steps * per_step
    device = resolve_device(cfg.model.device)
    use_cpu = device.type == "cpu" or (device.type == "cuda" and not torch.cuda.is_available())
    return {
        "output_dir": str(output_dir),
        # the loss
        "objective": o.name,
        "objective_hparams": dict(o.hparams) or None,
        "loss_agg_mode": o.agg,
        "beta": o.beta,
        "scale_rewards": "group" if cfg.advantage.estimator == "grpo" else "none",
        "reward_weights": [float(w) for w in cfg.rewards.weights] if cfg.rewards.weights is not None else None,
        # rollout and update
        "num_generations": r.group_size,
        "max_completion_length": r.max_new_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "top_k": r.top_k,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "steps_per_generation": per_generation,
        "num_iterations": u.epochs,
        "max_steps": total,
        "shuffle_dataset": False,  # the dataset is already in mhpo's prompt order
        "mask_truncated_completions": False,
        "gradient_checkpointing": False,
        # optimizer
        "learning_rate": opt.lr,
        "optim": "adamw_torch",
        "adam_beta1": opt.beta1,
        "adam_beta2": opt.beta2,
        "adam_epsilon": opt.eps,
        "weight_decay": opt.weight_decay,
        "max_grad_norm": u.max_grad_norm,
        **_schedule(opt, total, per_step),
        # machine, logging, checkpoints
        "seed": cfg.seed,
        "use_cpu": use_cpu,
        "bf16": cfg.model.dtype in ("bfloat16", "bf16-mixed"),
        "fp16": False,
        "ddp_backend": "gloo" if use_cpu and world > 1 else None,
        "ddp_find_unused_parameters": False,  # every parameter takes part in the loss
        "logging_steps": per_step,  # one log per RL step
        "report_to": list(t.report_to) or "none",
        "disable_tqdm": not t.progress,
        "save_strategy": "steps" if t.checkpoint_every else "no",
        "save_steps": max(t.checkpoint_every * per_step, 1),
        "save_total_limit": t.keep_checkpoints,
        "save_only_model": not t.save_optimizer,
        "log_completions": False,
    }


def _trl_prompt(example, encoder):
    """The prompt as TRL takes it: chat messages (system prompt first) when the chat template is used,
    so that TRL applies the template as mhpo's encoder does; the text as it is otherwise."""
    prompt = example.prompt
    if not getattr(encoder, "chat", False):
        if not isinstance(prompt, str):
            raise UsageError("a prompt given as chat messages needs a tokenizer with a chat template")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    system = getattr(encoder, "system_prompt", None)
    if system and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def rl_examples(cfg: Config, task, heldout: list) -> list:
    """The prompts of every RL step in ``mhpo train``'s order: step s trains on rows
    [(s-1) P, s P) (P = rollout.prompts_per_step), drawn from the task's stream seeded as the trainer's."""
    source = task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset(ex.key for ex in heldout))
    return source.next(cfg.train.steps * cfg.rollout.prompts_per_step)


def trl_dataset(examples: list, encoder):
    """A datasets.Dataset of ``prompt`` (TRL's form) and ``example_index`` (row of ``examples``: the
    reward functions read the example, answer and columns from there)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"prompt": [_trl_prompt(ex, encoder) for ex in examples], "example_index": list(range(len(examples)))}
    )


class _Tally:
    """Errors, timeouts and correctness of one scoring batch, over the reward functions."""

    def __init__(self):
        self.errors = self.timeouts = 0


class TRLReward:
    """One of ``rewards.functions`` as a TRL reward function, scored in mhpo's timeout worker (hard time
    limit, one-by-one fallback, error budget) on the examples named by ``example_index``."""

    def __init__(
        self, entry: str, name: str, examples: list, cfg: Config, task_reward: str, *, first: bool, last: bool
    ):
        from mhpo.rewards import RewardScorer

        self.__name__ = name  # TRL's metric name: rewards/<name>/mean
        self.examples, self.first, self.last = examples, first, last
        self.tally = _Tally()  # shared by the functions of one run (trl_rewards)
        rw = cfg.rewards
        self.scorer = RewardScorer(
            [entry], task_reward, None, rw.timeout_s, max_error_frac=rw.max_error_frac, error_window=rw.error_window
        )
        try:
            self.scorer.check()
        except ValueError as err:
            self.scorer.close()
            raise UsageError(str(err).splitlines()[0]) from None

    def __call__(self, prompts, completions, completion_ids=None, example_index=None, log_metric=None, **_):
        rows = [self.examples[int(i)] for i in example_index]
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        scores = self.scorer.score(rows, texts, completion_ids=completion_ids)
        tally = self.tally
        if self.first:  # a new scoring batch
            tally.errors = tally.timeouts = 0
        tally.errors += scores.errors
        tally.timeouts += scores.timeouts
        if log_metric is not None:
            if self.first:
                log_metric("accuracy", sum(scores.correct) / max(len(scores.correct), 1))
            if self.last:  # TRL averages over processes: counts x processes average to the total
                log_metric("reward/errors", float(tally.errors * _world_size()))
                log_metric("reward/timeouts", float(tally.timeouts * _world_size()))
        return list(scores.per_function[self.__name__])

    def close(self) -> None:
        self.scorer.close()


def trl_rewards(cfg: Config, task_reward: str, examples: list) -> list[TRLReward]:
    """One TRL reward function per entry of ``rewards.functions`` (weights go to TRL's reward_weights)."""
    from mhpo.rewards import resolve

    entries = list(cfg.rewards.functions)
    names = [name for name, _ in resolve(entries, task_reward)]
    out: list[TRLReward] = []
    try:
        for i, (entry, name) in enumerate(zip(entries, names)):
            out.append(TRLReward(entry, name, examples, cfg, task_reward, first=i == 0, last=i == len(entries) - 1))
    except BaseException:
        for fn in out:
            fn.close()
        raise
    shared = _Tally()
    for fn in out:
        fn.tally = shared
    return out


def mhpo_metrics(logs: dict[str, Any]) -> dict[str, Any]:
    """TRL's logged keys with mhpo's names where mhpo logs the same metric (:data:`METRIC_NAMES`,
    objective/<k> -> policy/<k>, rewards/<f>/mean -> reward/<f>); the others as TRL names them."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if key in METRIC_NAMES:
            key = METRIC_NAMES[key]
        elif key.startswith("objective/"):
            key = "policy/" + key[len("objective/") :]
        elif key.startswith("rewards/") and key.endswith("/mean"):
            key = "reward/" + key[len("rewards/") : -len("/mean")]
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The run.


def weights_fingerprint(model) -> str:
    """A short digest of the weights, computed where they live (sums of w and w^2 per tensor, float64):
    processes that hold bit-identical weights get the same digest."""
    import torch

    with torch.no_grad():
        sums = [
            (name, float(p.double().sum()), float(p.double().square().sum())) for name, p in model.named_parameters()
        ]
    return hashlib.sha256(json.dumps(sums).encode()).hexdigest()[:16]


class _Evaluator:
    """mhpo's held-out evaluation (and eval.benchmarks) of the policy, on process 0: evals.jsonl and
    samples/, as ``mhpo train`` writes them."""

    def __init__(self, plan, policy, run_dir: Path):
        from mhpo.evaluation.hook import open_hook

        self.plan, self.policy, self.run_dir = plan, policy, run_dir
        try:
            self.bench = open_hook(plan.cfg, run_dir, plan.max_new_tokens)
        except ValueError as err:
            raise UsageError(str(err).splitlines()[0]) from None

    def __call__(self, step: int, stage: str) -> dict:
        from mhpo.trainer.evaluate_run import heldout_results

        results, records = heldout_results(self.plan, self.policy, self.bench, step)
        if not results:
            return results
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
        with open(self.run_dir / EVALS_FILE, "a") as fh:
            fh.write(json.dumps({"step": step, "stage": stage, **clean}) + "\n")
        save_samples(self.run_dir, step, records)
        return results

    def close(self) -> None:
        if self.bench is not None:
            self.bench.close()


def _callback(run_dir: Path, per_step: int, total_steps: int, evaluator: _Evaluator | None, every: int, state: dict):
    """A TrainerCallback: metrics.jsonl on process 0 (one line per RL step) and periodic evaluations."""
    from transformers import TrainerCallback

    class MHPOLog(TrainerCallback):
        def __init__(self):
            self.last = time.perf_counter()

        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "train_runtime" in logs:  # the closing summary of trainer.train()
                state["trl"] = logs
                return
            if not trainer_state.is_world_process_zero or "loss" not in logs:
                return
            now = time.perf_counter()
            record = {
                "step": trainer_state.global_step // per_step,
                "optimizer_step": trainer_state.global_step,
                **mhpo_metrics(logs),
                "time/step": now - self.last,
            }
            self.last = now
            with open(run_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

        def on_step_end(self, args, trainer_state, control, **kwargs):
            step, rest = divmod(trainer_state.global_step, per_step)
            if evaluator is None or not every or rest or step % every or step >= total_steps:
                return
            if trainer_state.is_world_process_zero:
                state["last_eval"] = (step, evaluator(step, "periodic"))

    return MHPOLog()


def _loading_config(cfg: Config) -> Config:
    """``cfg`` with model.device set to this process's GPU under a multi-process CUDA launch (each
    process loads its own copy there instead of all on cuda:0)."""
    import torch

    from mhpo.models.device import resolve_device

    local = os.environ.get("LOCAL_RANK")
    if local is None or _world_size() == 1 or resolve_device(cfg.model.device).type != "cuda":
        return cfg
    if not torch.cuda.is_available():
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=f"cuda:{int(local)}"))


def _reference_source(model, source: str, scratch: Path) -> str:
    """Where TRL loads the KL reference from (the RL-initial policy, as ``mhpo train``): ``source``
    when from_pretrained can read it, else (a built-in tiny model, a GGUF file) a copy saved now."""
    from mhpo.models.sources import BUILT_IN, is_gguf

    if Path(source).is_dir() or (source not in BUILT_IN and not is_gguf(source)):
        return source
    path = scratch / "reference"
    model.save_pretrained(path)
    return str(path)


def run_trl(cfg: Config, output_dir, *, console=None) -> dict:
    """Train ``cfg`` with TRL into ``output_dir`` (see the module docstring); returns the summary (also
    summary.json, written by process 0). Under torchrun / accelerate every process calls this."""
    import torch
    from accelerate.utils import gather_object
    from rich.console import Console

    from mhpo.generation.policy import quiet_transformers
    from mhpo.integrations.trl import MHPOConfig, MHPOTrainer
    from mhpo.models.multimodal import has_images

    t_start = time.perf_counter()
    rank, world = _rank(), _world_size()
    main = rank == 0
    console = console or Console(highlight=False, soft_wrap=True, quiet=not main)
    check_carries(cfg, world)
    cfg = trainer_logprobs(cfg)
    run_dir = Path(output_dir)
    threads = torch.get_num_threads()
    with prepare_run(cfg) as plan, tempfile.TemporaryDirectory(prefix="mhpo-trl-") as scratch:
        cfg = plan.cfg
        if has_images(plan.heldout or plan.task.heldout(1, cfg.eval.seed)):
            raise _fail("task.name", cfg.task.name, "a text task", "tasks with images are not wired to TRL here")
        kwargs = trl_args(cfg, run_dir / TRL_DIR, num_processes=world)
        per_step = cfg.update.num_minibatches * cfg.update.epochs
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / CONFIG_FILE, config_header() + ENGINE_HEADER + to_yaml(cfg))
            for name in (METRICS_FILE, EVALS_FILE):
                (run_dir / name).unlink(missing_ok=True)
            for warning in config_warnings(cfg):
                console.print(f"[bold red]warning[/]: {warning}")
        rewards, evaluator = [], None
        try:
            torch.set_num_threads(cfg.train.threads)
            quiet_transformers()
            load = model_loader(_loading_config(cfg), log=lambda m: console.print(f"[bold]mhpo train[/]: {m}"))
            source, warm = warmup_stage(plan, run_dir, load, console)
            model, processor = load(source)
            policy = run_policy(cfg, model, processor)
            if cfg.objective.beta > 0:
                model.config._name_or_path = _reference_source(model, source, Path(scratch))
            examples = rl_examples(cfg, plan.task, plan.heldout)
            dataset = trl_dataset(examples, policy.encoder)
            rewards = trl_rewards(cfg, plan.task.reward, examples)
            state: dict[str, Any] = {}
            before: dict = {}
            if main:
                evaluator = _Evaluator(plan, policy, run_dir)
                before = evaluator(0, "before")
                if "greedy/accuracy" in before:
                    console.print(f"before RL: held-out greedy accuracy {before['greedy/accuracy']:.1%}")
            console.print(
                f"[bold]mhpo train --engine trl[/]: {world} process(es), {cfg.train.steps} RL steps x "
                f"{per_step} optimizer steps; micro-batch {kwargs['per_device_train_batch_size']}, "
                f"accumulation {kwargs['gradient_accumulation_steps']}, steps_per_generation "
                f"{kwargs['steps_per_generation']}"
            )
            trainer = MHPOTrainer(
                model,
                reward_funcs=rewards,
                args=MHPOConfig(**kwargs),
                train_dataset=dataset,
                processing_class=policy.tokenizer,
                callbacks=[_callback(run_dir, per_step, cfg.train.steps, evaluator, cfg.eval.every, state)],
            )
            trainer.train()
            prints = gather_object([weights_fingerprint(trainer.model)])
            summary: dict = {}
            if main:
                summary = _finish(plan, policy, trainer, run_dir, evaluator, before, warm, state, prints, t_start)
                console.print(
                    f"[bold]mhpo train --engine trl[/]: weights on the {world} process(es) "
                    + ("identical" if summary["trl"]["weights_in_sync"] else "DIFFER")
                )
            trainer.accelerator.wait_for_everyone()
            return summary
        finally:
            torch.set_num_threads(threads)
            for fn in rewards:
                fn.close()
            if evaluator is not None:
                evaluator.close()
            _end_process_group()


def _finish(plan, policy, trainer, run_dir: Path, evaluator, before, warm, state, prints, t_start) -> dict:
    """Process 0 after training: evaluation after RL, the final model checkpoint, plots, summary.json."""
    import trl

    cfg = plan.cfg
    steps = cfg.train.steps
    last = state.get("last_eval")
    after = last[1] if last is not None and last[0] == steps else evaluator(steps, "after")
    if "greedy/accuracy" in after:
        trainer.accelerator.print(f"after RL: held-out greedy accuracy {after['greedy/accuracy']:.1%}")
    final = None
    if cfg.train.final_checkpoint != "none":
        final = save_checkpoint(
            run_dir / CHECKPOINTS,
            steps,
            model=trainer.model,
            tokenizer=policy.processor,
            optimizer=None,
            scheduler=None,
            state={},
            keep=cfg.train.keep_checkpoints,
            kind="model",
        )
    plots = [str(p) for p in plot_run(run_dir)] if cfg.train.plots else []
    summary = make_summary(cfg, run_dir, before, after, warm, time.perf_counter() - t_start, plots, final)
    trl_dir = run_dir / TRL_DIR
    summary["engine"] = "trl"
    summary["tensorboard"] = str(trl_dir / "runs") if "tensorboard" in cfg.train.report_to else None
    summary["trl"] = {
        "version": trl.__version__,
        "num_processes": trainer.accelerator.num_processes,
        "optimizer_steps": trainer.state.global_step,
        "output_dir": str(trl_dir),
        "checkpoints": sorted(p.name for p in trl_dir.glob("checkpoint-*")),
        "weights_fingerprints": list(prints),
        "weights_in_sync": len(set(prints)) == 1,
        **{k: v for k, v in state.get("trl", {}).items() if isinstance(v, (int, float))},
    }
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
