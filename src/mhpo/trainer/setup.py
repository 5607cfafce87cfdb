"""Setting a run up: validate the config before any model loads (:func:`prepare_run`), load the
policy, its optimizer, lr schedule and reference (:func:`build_policy`), run the cached warm-up stage.

    with prepare_run(cfg) as plan:                 task, held-out set, reward worker, resolved config
        load = model_loader(plan.cfg)              source -> (model, processor): tiny or pretrained
        initial, info = warmup_stage(plan, run_dir, load, console)
        policy = build_policy(plan.cfg, load, initial, initial)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mhpo.errors import UsageError
from mhpo.evaluation.hook import check_config as check_benchmarks
from mhpo.generation.policy import LoadedPolicy, load_weights, wrap_policy
from mhpo.models.device import resolve_device, resolve_precision
from mhpo.models.lora import apply_lora, enable_gradient_checkpointing
from mhpo.models.multimodal import has_images
from mhpo.models.sources import BUILT_IN, TINY, TINY_VLM, check_model_source
from mhpo.models.tiny import build_tiny
from mhpo.objectives import get_objective
from mhpo.objectives.aggregation import AGG_MODES
from mhpo.rewards import RewardScorer, resolve
from mhpo.seeding import derive_seed
from mhpo.tasks import build_task
from mhpo.trainer.config import Config
from mhpo.trainer.defaults import resolve_defaults
from mhpo.trainer.progress import Progress
from mhpo.trainer.trackers import check_report_to
from mhpo.trainer.warmup import ensure_warmup, warmup_enabled, warmup_path

# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked without loading a model.


@dataclass
class Plan:
    """A validated config with the pieces built from it (no model loaded yet). It holds a running
    reward worker: use it as a context manager (or call :meth:`close`)."""

    cfg: Config
    task: Any  # tasks.Task
    hparams: dict
    max_new_tokens: int
    heldout: list  # empty when eval.size = 0
    scorer: Any  # rewards.RewardScorer (worker started, functions imported)
    pass_k: int = 0  # eval.pass_k
    eval_max_new_tokens: int = 0  # eval.max_new_tokens resolved

    def close(self) -> None:
        """Stop the reward worker."""
        self.scorer.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare_run(cfg: Config) -> Plan:
    """Check the config against the registries, build the task and the held-out set, resolve the
    config's unset values (:func:`mhpo.trainer.defaults.resolve_defaults`: ``Plan.cfg`` is what runs),
    start the reward worker and import the reward functions. Raises UsageError (one line) on any problem.
    The caller closes the plan (``with prepare_run(cfg) as plan:``)."""
    from mhpo.models.device import resolve_device

    def fail(err: Exception) -> UsageError:
        return UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__)

    try:
        hparams = get_objective(cfg.objective.name).resolve(cfg.objective.hparams)
        if cfg.objective.agg not in AGG_MODES:
            raise ValueError(f"unknown objective.agg {cfg.objective.agg!r}; valid aggregations: {', '.join(AGG_MODES)}")
        resolve(cfg.rewards.functions, "exact_match")  # names and specs; 'auto' is resolved below
        check_report_to(cfg.train.report_to)
        check_model_source(cfg.model.name_or_path)
        resolve_device(cfg.model.device)
        check_lora(cfg.model.lora)
        if cfg.update.num_minibatches > cfg.rollout.prompts_per_step * cfg.rollout.group_size:
            raise ValueError(
                f"update.num_minibatches={cfg.update.num_minibatches} exceeds the rollout batch "
                f"({cfg.rollout.prompts_per_step} x {cfg.rollout.group_size} rows)"
            )
        task = build_task(cfg.task)
        cfg = resolve_defaults(cfg, task.max_new_tokens)
        size, pass_k = cfg.eval.size, cfg.eval.pass_k
        heldout = task.heldout(size, cfg.eval.seed) if size else []
        probe = heldout or task.heldout(1, cfg.eval.seed)
        check_modality(cfg, probe)
        if cfg.rollout.staleness and has_images(probe):
            raise ValueError("rollout.staleness > 0 supports text tasks only (pending batches with images)")
        if cfg.eval.benchmarks:  # names and files of eval.benchmarks (loaded in _run)
            check_benchmarks(cfg.eval)
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise fail(err) from None
    try:
        scorer = RewardScorer(
            cfg.rewards.functions,
            task.reward,
            cfg.rewards.weights,
            cfg.rewards.timeout_s,
            max_error_frac=cfg.rewards.max_error_frac,
            error_window=cfg.rewards.error_window,
        )
    except ValueError as err:
        raise fail(err) from None
    try:
        scorer.check()
    except ValueError as err:
        scorer.close()
        raise fail(err) from None
    return Plan(cfg, task, hparams, cfg.rollout.max_new_tokens, heldout, scorer, pass_k, cfg.eval.max_new_tokens)


def check_lora(lora) -> None:
    """ValueError unless model.lora.target_modules is a non-empty list of names (when LoRA is on); the
    names are checked against the model when it loads (:func:`mhpo.models.lora.check_target_modules`)."""
    targets = lora.target_modules
    if lora.rank > 0 and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ValueError(
            f"config key 'model.lora.target_modules' must be a non-empty list of module names "
            f"(e.g. [q_proj, v_proj] or [all-linear]), got {targets!r}"
        )


def check_modality(cfg: Config, heldout: list) -> None:
    """ValueError when a task with images meets the built-in text-only model."""
    if cfg.model.name_or_path == TINY and has_images(heldout):
        raise ValueError(
            f"task {cfg.task.name!r} has images but model 'tiny' is text-only; use model.name_or_path=tiny-vlm "
            "(or a vision-language model such as a Qwen2.5-VL dir), e.g. mhpo train --config vlm"
        )


# ---------------------------------------------------------------------------------------------
# The policy.


@dataclass
class Policy(LoadedPolicy):
    """The model being trained (:class:`mhpo.generation.policy.LoadedPolicy`: model, tokenizer, prompt
    encoder, end tokens, precision) and what training adds: optimizer, lr schedule, the reference."""

    optimizer: Any = None
    scheduler: Any = None
    reference: Any = None  # frozen RL-initial policy, when beta > 0 or log_kl (with LoRA: the policy itself)

    def reference_scope(self):
        """The context in which ``reference`` is the RL-initial policy: a LoRA policy's adapters disabled."""
        if self.reference is not None and self.reference is self.model:
            return self.model.disable_adapter()
        return contextlib.nullcontext()


def _build_tiny(cfg: Config):
    return build_tiny(cfg.model.tiny, derive_seed(cfg.seed, "init"))


def _build_tiny_vlm(cfg: Config):
    from mhpo.models.vlm import build_tiny_vlm  # transformers' VLM classes: imported only when used

    return build_tiny_vlm(cfg.model.tiny, cfg.model.vision, derive_seed(cfg.seed, "init"))


# Built-in models: name -> builder(cfg) -> (model, tokenizer or processor), seeded from cfg.seed.
BUILDERS = {TINY: _build_tiny, TINY_VLM: _build_tiny_vlm}


def run_precision(cfg: Config):
    """The run's :class:`mhpo.models.Precision` (model.dtype on model.device)."""
    from mhpo.models.device import resolve_device

    return resolve_precision(
        cfg.model.dtype, resolve_device(cfg.model.device), built_in=cfg.model.name_or_path in BUILT_IN
    )


def model_loader(cfg: Config, log=None):
    """source -> (model, tokenizer or processor): a built-in name (:data:`BUILDERS`) builds the
    seeded tiny model, anything else is loaded with from_pretrained (a named model, a GGUF file, a
    model dir, a hub id, a warm-up dir or a checkpoint dir; a vision-language model comes with its
    processor). Weights come in the dtype of :func:`run_precision` (float32 under bf16-mixed). A LoRA
    checkpoint loads onto ``base`` (:func:`mhpo.generation.policy.load_weights`)."""
    device, precision = resolve_device(cfg.model.device), run_precision(cfg)
    builders = {name: (lambda build=build: build(cfg)) for name, build in BUILDERS.items()}

    def load(source: str, base: str | None = None):
        try:
            return load_weights(
                source,
                base=base,
                precision=precision,
                device=device,
                trust_remote_code=cfg.model.trust_remote_code,
                attn_implementation=cfg.model.attn_implementation,
                builders=builders,
                log=log,
            )
        except ValueError as err:
            raise UsageError(str(err)) from None

    return load


def warmup_stage(plan: Plan, run_dir: Path, load, console) -> tuple[str, dict]:
    """(source of the RL-initial policy, warm-up info): the cached warm-up dir when the warm-up is
    enabled, else the configured model itself."""
    cfg = plan.cfg
    if not warmup_enabled(cfg):
        return cfg.model.name_or_path, {}
    heldout_keys = frozenset(ex.key for ex in plan.heldout)
    show = cfg.train.progress and console.is_terminal
    with Progress(console, show, cfg.warmup.max_steps, 0, label="warm-up") as bar:
        path, info = ensure_warmup(
            cfg,
            run_dir,
            build=lambda: load(cfg.model.name_or_path),
            task=plan.task,
            scorer=plan.scorer,
            heldout_keys=heldout_keys,
            max_new_tokens=plan.max_new_tokens,
            log=lambda m: console.print(m, highlight=False),
            progress=bar.warmup,
        )
    return str(path), {**{k: v for k, v in info.items() if k != "history"}, "path": str(path)}


def initial_source(cfg: Config, run_dir: Path) -> str:
    """Where a run's RL-initial policy comes from: its cached warm-up dir when the warm-up is enabled,
    else model.name_or_path (the base of a LoRA run's adapters)."""
    return str(warmup_path(cfg, run_dir)) if warmup_enabled(cfg) else cfg.model.name_or_path


def build_policy(cfg: Config, load, source: str, initial: str) -> Policy:
    """Load the policy from ``source`` (the initial policy or a checkpoint), its optimizer, lr
    schedule and, if the objective needs one, the frozen reference (loaded from ``initial``).

    With LoRA (model.lora.rank > 0) the policy is ``initial`` with adapters (fresh ones, or a LoRA
    checkpoint's), only the adapters train, and the reference is that same model with its adapters
    disabled (``Policy.reference_scope``): no second copy of the weights."""
    lora = cfg.model.lora
    if lora.rank > 0:
        model, processor = load(source, base=initial) if source != initial else with_lora(cfg, *load(initial), initial)
    else:
        model, processor = load(source)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    reference = None
    if cfg.objective.beta > 0 or cfg.objective.log_kl:
        if lora.rank > 0:
            reference = model
        else:
            reference, _ = load(initial)
            reference.eval().requires_grad_(False)
    loaded = run_policy(cfg, model, processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=fused_adamw(trainable),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, cfg.train.steps))
    return Policy(**vars(loaded), optimizer=optimizer, scheduler=scheduler, reference=reference)


def fused_adamw(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one pass over each parameter, no temporaries) where PyTorch has it: every
    parameter of ``params`` on a CPU or CUDA device. Same update as the per-tensor loop up to float
    rounding (1e-7 after 5 steps); 0.10 against 0.33 s a step for SmolLM2-135M's parameters on a
    2-core AMD EPYC (float32)."""
    return all(p.device.type in ("cpu", "cuda") for p in params)


def with_lora(cfg: Config, model, processor, base: str) -> tuple:
    """(``model`` with fresh adapters as model.lora says, ``processor``); UsageError for target modules
    that match nothing. ``base`` (the RL-initial policy's source) is recorded in the adapter config.
    The adapters' random init is seeded from the run seed (the global generator is left as it was)."""
    lora = cfg.model.lora
    base = str(Path(base).resolve()) if Path(base).is_dir() else base
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "lora"))
            model = apply_lora(
                model,
                rank=lora.rank,
                alpha=lora_alpha(lora),
                dropout=lora.dropout,
                target_modules=lora.target_modules,
                base=base,
            )
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from None
    return model, processor


def lora_alpha(lora) -> float:
    """model.lora.alpha, or 2 x rank when unset."""
    return float(lora.alpha) if lora.alpha is not None else 2.0 * lora.rank


def run_policy(cfg: Config, model, processor) -> LoadedPolicy:
    """``model`` and ``processor`` with the run's precision, chat template and system prompt
    (:func:`mhpo.generation.policy.wrap_policy`); UsageError when the tokenizer cannot serve the run."""
    try:
        return wrap_policy(
            model,
            processor,
            precision=run_precision(cfg),
            chat_template=cfg.model.chat_template,
            system_prompt=cfg.task.system_prompt,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def lr_factor(step: int, optim, total: int) -> float:
    """lr multiplier at RL step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant, or linear / cosine decay with progress p = (step - warmup) / (total - warmup) toward
    ``min_lr_ratio`` (reached after the last step, as in transformers' schedules):

        linear  lo + (1 - lo) (1 - p)        cosine  lo + (1 - lo) (1 + cos(pi p)) / 2

    Why not transformers' schedules: their warm-up starts at 0 (the first step would not move the
    weights: (step) / warmup against (step + 1) / warmup here) and their linear decay has no floor.
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(total - optim.warmup_steps, 1)
    frac = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    lo = optim.min_lr_ratio
    if optim.schedule == "linear":
        return lo + (1.0 - lo) * (1.0 - frac)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))
