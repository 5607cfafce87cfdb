"""The training loop behind `mhpo train`: RL with verifiable rewards on a causal LM, GRPO-family objectives.

The recipe, per RL step:

    prompts  = source.next(prompts_per_step)                       (resumable stream)
    rollout  = sample(policy, prompts, G per prompt)               KV cache, top_k=0, top_p=1
    R        = rewards(rollout)                                    in a worker process, hard time limit
    A        = group advantages(R)                                 grpo | dr_grpo
    old_logp = logp under the policy now (first minibatch: from its own update forward pass, the
               rest: one no-grad pass); ref_logp only when beta > 0 or log_kl
    epochs x minibatches:  policy_loss(objective) -> clip grad norm -> AdamW step
    lr schedule step; log; evaluate / checkpoint when due

Stages: validate everything (no model loaded) -> supervised warm-up (cached; tiny model only by
default) -> evaluation before RL -> RL -> evaluation after RL -> plots and summary.json.

Other features call :func:`run_training` (``mhpo compare`` runs it once per objective x seed with a
shared ``warmup.cache_dir``; a finished run is skipped, a stopped one resumed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mhpo.errors import Interrupted, UsageError
from mhpo.seeding import derive_seed
from mhpo.trainer.config import Config, ConfigError, load_config, save_config, to_dict
from mhpo.trainer.pending import from_state, optimizer_steps, to_state

if TYPE_CHECKING:
    from mhpo.trainer.pending import ScoredBatch

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
# Keys that may differ between a run and its resumption (they do not change the computation).
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.report_to", "train.plots", "train.threads")


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    try:
        return load_config(path)
    except ConfigError as err:
        raise UsageError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked without loading a model.


@dataclass
class Plan:
    """A validated config with the pieces built from it (no model loaded yet)."""

    cfg: Config
    task: Any  # tasks.Task
    hparams: dict
    max_new_tokens: int
    heldout: list  # empty when eval.size = 0
    scorer: Any  # rewards.RewardScorer (worker started, functions imported)
    pass_k: int = 0  # eval.pass_k
    eval_max_new_tokens: int = 0  # eval.max_new_tokens resolved


def validate(cfg: Config) -> Plan:
    """Check the config against the registries, build the task and the held-out set, resolve the
    config's unset values (:func:`mhpo.trainer.defaults.resolve_defaults`: ``Plan.cfg`` is what runs),
    start the reward worker and import the reward functions. Raises UsageError (one line) on any problem."""
    from mhpo.models import check_model_source, resolve_device
    from mhpo.objectives import get_objective
    from mhpo.objectives.aggregation import AGG_MODES
    from mhpo.rewards import RewardScorer, resolve
    from mhpo.tasks import build_task
    from mhpo.trainer.defaults import resolve_defaults
    from mhpo.trainer.trackers import check_report_to

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
        if cfg.update.num_minibatches > cfg.rollout.prompts_per_step * cfg.rollout.group_size:
            raise ValueError(
                f"update.num_minibatches={cfg.update.num_minibatches} exceeds the rollout batch "
                f"({cfg.rollout.prompts_per_step} x {cfg.rollout.group_size} rows)"
            )
        task = build_task(cfg.task)
        cfg = resolve_defaults(cfg, task.max_new_tokens)
        size, pass_k = cfg.eval.size, cfg.eval.pass_k
        heldout = task.heldout(size, cfg.eval.seed) if size else []
        _check_modality(cfg, heldout or task.heldout(1, cfg.eval.seed))
        if cfg.rollout.staleness and _has_images(heldout or task.heldout(1, cfg.eval.seed)):
            raise ValueError("rollout.staleness > 0 supports text tasks only (pending batches with images)")
        if cfg.eval.benchmarks:  # names and files of eval.benchmarks (loaded in _run)
            from mhpo.benchmarks.training import check_config

            check_config(cfg.eval)
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


def _has_images(examples: list) -> bool:
    from mhpo.models.multimodal import IMAGE_COLUMN

    return any(ex.columns.get(IMAGE_COLUMN) is not None for ex in examples[:1])


def _check_modality(cfg: Config, heldout: list) -> None:
    """ValueError when a task with images meets the built-in text-only model."""
    from mhpo.models import TINY

    if cfg.model.name_or_path == TINY and _has_images(heldout):
        raise ValueError(
            f"task {cfg.task.name!r} has images but model 'tiny' is text-only; use model.name_or_path=tiny-vlm "
            "(or a vision-language model such as a Qwen2.5-VL dir), e.g. mhpo train --preset vlm"
        )


# ---------------------------------------------------------------------------------------------
# Run directory state.


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        full = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and not full.endswith(("hparams", "args")):
            out += _diff(va, vb, full + ".")
        elif va != vb:
            out.append(full)
    return out


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def config_changes(saved: Config, cfg: Config) -> list[str]:
    """Dotted keys that differ between a run's saved config and ``cfg``, ignoring those a resume may
    change and those ``cfg`` leaves unset (null / auto: the saved run's resolved value stands)."""
    from mhpo.trainer.defaults import UNSET

    new = to_dict(cfg)
    return [
        k
        for k in _diff(to_dict(saved), new)
        if k not in RESUMABLE_CHANGES and not (k in UNSET and _get(new, k) == UNSET[k])
    ]


def resumed_config(saved: Config, cfg: Config) -> Config:
    """The saved config of a run being resumed, with the keys a resume may change taken from ``cfg``
    (where it sets them)."""
    from mhpo.trainer.config import from_dict
    from mhpo.trainer.defaults import UNSET

    tree, new = to_dict(saved), to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        if not (key in UNSET and _get(new, key) == UNSET[key]):
            section, name = key.split(".")
            tree[section][name] = new[section][name]
    return from_dict(tree)


# ---------------------------------------------------------------------------------------------
# The training run.


def run_training(config: Config, output_dir: str | Path, *, resume: str = "auto", console=None) -> dict:
    """Train with ``config`` into ``output_dir``; returns the summary dict (also in summary.json).

    resume: "auto"    - a finished run with this config is returned as is (not retrained), a
                        stopped one continues from its last complete checkpoint, else start fresh;
            "require" - continue a stopped run (error if there is none);
            "never"   - start fresh (error if the directory already holds a run).
    Raises UsageError for a bad config, task, reward function or model (before any model loads).
    """
    import torch
    from rich.console import Console

    from mhpo.trainer.defaults import config_warnings
    from mhpo.trainer.interrupts import Interrupts

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

    plan = validate(config)
    for warning in config_warnings(plan.cfg):
        console.print(f"[bold red]warning[/]: {warning}", highlight=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(plan.cfg.train.threads)
        _quiet_transformers()
        with Interrupts() as stop:
            return _run(plan, run_dir, console, resuming=saved_cfg is not None, t_start=t_start, stop=stop)
    finally:
        torch.set_num_threads(threads)
        plan.scorer.close()


@dataclass
class Policy:
    """The model being trained and everything built around it for one run."""

    model: Any
    tokenizer: Any  # the text tokenizer
    encoder: Any  # rollout.PromptEncoder or multimodal.VisionPromptEncoder
    eos_ids: list[int]
    optimizer: Any
    scheduler: Any
    reference: Any = None  # frozen RL-initial policy, when beta > 0 or log_kl
    processor: Any = None  # what is saved with the model: the tokenizer, or a VLM's processor
    precision: Any = None  # models.Precision: weights' dtype and autocast (bf16-mixed)

    def autocast(self):
        """The autocast context of every forward pass of the run (a no-op unless bf16-mixed)."""
        import contextlib

        if self.precision is None:
            return contextlib.nullcontext()
        return self.precision.context(next(self.model.parameters()).device)


def _build_tiny(cfg: Config):
    from mhpo.models import build_tiny

    return build_tiny(cfg.model.tiny, derive_seed(cfg.seed, "init"))


def _build_tiny_vlm(cfg: Config):
    from mhpo.models.vlm import build_tiny_vlm

    return build_tiny_vlm(cfg.model.tiny, cfg.model.vision, derive_seed(cfg.seed, "init"))


# Built-in models: name -> builder(cfg) -> (model, tokenizer or processor), seeded from cfg.seed.
BUILDERS = {"tiny": _build_tiny, "tiny-vlm": _build_tiny_vlm}


def model_loader(cfg: Config, log=None):
    """source -> (model, tokenizer or processor): a built-in name (:data:`BUILDERS`) builds the
    seeded tiny model, anything else is loaded with from_pretrained (a named model, a GGUF file, a
    model dir, a hub id, a warm-up dir or a checkpoint dir; a vision-language model comes with its
    processor). Weights come in the dtype of :func:`run_precision` (float32 under bf16-mixed)."""
    from mhpo.models import resolve_device
    from mhpo.models.loading import load_pretrained

    device = resolve_device(cfg.model.device)
    dtype = run_precision(cfg).weights

    def load(source: str):
        try:
            if source in BUILDERS:
                model, tok = BUILDERS[source](cfg)
                return model.to(device=device, dtype=dtype), tok
            return load_pretrained(
                source,
                dtype=dtype,
                device=device,
                trust_remote_code=cfg.model.trust_remote_code,
                attn_implementation=cfg.model.attn_implementation,
                log=log,
            )
        except (OSError, ValueError) as err:
            raise UsageError(f"model {source!r} could not be loaded: {str(err).splitlines()[0]}") from None

    return load


def run_precision(cfg: Config):
    """The run's :class:`mhpo.models.Precision` (model.dtype on model.device)."""
    from mhpo.models import BUILT_IN, resolve_device, resolve_precision

    return resolve_precision(
        cfg.model.dtype, resolve_device(cfg.model.device), built_in=cfg.model.name_or_path in BUILT_IN
    )


def warmup_stage(plan: Plan, run_dir: Path, load, console) -> tuple[str, dict]:
    """(source of the RL-initial policy, warm-up info): the cached warm-up dir when the warm-up is
    enabled, else the configured model itself."""
    from mhpo.trainer.warmup import ensure_warmup, warmup_enabled

    cfg = plan.cfg
    if not warmup_enabled(cfg):
        return cfg.model.name_or_path, {}
    heldout_keys = frozenset(ex.key for ex in plan.heldout)
    show = cfg.train.progress and console.is_terminal
    with _progress(console, show, cfg.warmup.max_steps, 0, label="warm-up") as bar:
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


def build_policy(cfg: Config, load, source: str, initial: str) -> Policy:
    """Load the policy from ``source`` (the initial policy or a checkpoint), its optimizer, lr
    schedule and, if the objective needs one, the frozen reference (loaded from ``initial``)."""
    import torch

    from mhpo.models.multimodal import text_tokenizer
    from mhpo.trainer.rollout import build_encoder, eos_token_ids

    model, processor = load(source)
    tokenizer = text_tokenizer(processor)
    model.train()
    reference = None
    if cfg.objective.beta > 0 or cfg.objective.log_kl:
        reference, _ = load(initial)
        reference.eval().requires_grad_(False)
    try:
        encoder = build_encoder(processor, chat_template=cfg.model.chat_template, system_prompt=cfg.task.system_prompt)
    except ValueError as err:
        raise UsageError(str(err)) from None
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, cfg.train.steps))
    return Policy(
        model,
        tokenizer,
        encoder,
        eos_token_ids(model, tokenizer),
        optimizer,
        scheduler,
        reference,
        processor,
        run_precision(cfg),
    )


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
    from mhpo.trainer import checkpoint as ckpt

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


class TrainingRun:
    """One run directory being trained: its policy, data, logs and checkpoints, and the state a
    checkpoint carries besides weights and optimizer (evaluation before RL, warm-up, wall time)."""

    def __init__(self, plan: Plan, run_dir: Path, console, *, resuming: bool, t_start: float, stop=None):
        from mhpo.benchmarks.training import open_hook
        from mhpo.trainer import checkpoint as ckpt
        from mhpo.trainer.interrupts import Interrupts
        from mhpo.trainer.metrics import RunLogger

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
        # The RL-initial policy is only needed when starting, or as the KL reference.
        needs_initial = self.resume_from is None or cfg.objective.beta > 0 or cfg.objective.log_kl
        initial, self.warm_info = (
            warmup_stage(plan, run_dir, load, console) if needs_initial else (cfg.model.name_or_path, {})
        )
        self.pol = build_policy(cfg, load, str(self.resume_from) if self.resume_from else initial, initial)
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
        import torch

        from mhpo.trainer import checkpoint as ckpt

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
            self.console.print(_accuracy_line("before RL", self.before, self.plan.pass_k), highlight=False)

    def train(self) -> None:
        """The RL steps after the start step, with periodic evaluations and checkpoints."""
        from mhpo.trainer import checkpoint as ckpt

        cfg, steps = self.cfg, self.cfg.train.steps
        self.rl_started = True
        with _progress(self.console, cfg.train.progress, steps, self.start_step) as bar:
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
        from mhpo.trainer import checkpoint as ckpt

        held.enter_context(self.stop.shield())
        ckpt.maybe_fault("update", step)

    def save_on_stop(self) -> Path | None:
        """After Ctrl-C / SIGTERM: a full checkpoint of the last finished step when it has none yet.

        Stopped before a step's update, the RNG and data stream go back to that step's start, so the
        checkpoint equals the one a periodic save would have written; stopped inside the update by a
        second signal, the weights are torn and nothing is saved."""
        from mhpo.trainer import checkpoint as ckpt

        torn = self.stop.forced and self.snapshot_step == self.trained + 1
        if not self.rl_started or self.trained in (0, self.saved_step) or torn:
            return None
        if self.snapshot_step == self.trained + 1:  # stopped during a step, before its update
            ckpt.set_rng_state(*self.snapshot[0])
            self.source.load_state_dict(self.snapshot[1])
            self.pending = deque(self.snapshot[2])
        return self.save(self.trained)

    def finish(self) -> tuple[dict, Path | None]:
        """(evaluation after RL, final checkpoint or None; train.final_checkpoint: full | model | none)."""
        from mhpo.trainer import checkpoint as ckpt

        steps, kind = self.cfg.train.steps, self.cfg.train.final_checkpoint
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
        from mhpo.trainer.evaluation import evaluate

        plan, pol, cfg = self.plan, self.pol, self.cfg
        results, records = {}, []
        if plan.heldout:
            with pol.autocast():
                results, records = evaluate(
                    pol.model,
                    pol.tokenizer,
                    pol.encoder,
                    plan.scorer,
                    plan.heldout,
                    max_new_tokens=plan.eval_max_new_tokens,
                    eos_ids=pol.eos_ids,
                    pass_k=plan.pass_k,
                    temperature=cfg.eval.temperature,
                    batch_size=cfg.eval.batch_size,
                    seed=derive_seed(cfg.eval.seed, "pass@k"),
                )
        if self.bench is not None:
            with pol.autocast():
                results.update(self.bench(pol.model, pol.tokenizer, pol.encoder, pol.eos_ids, step))
        if not results:
            return results
        self.logger.log_eval(step, stage, results)
        if records:
            samples = self.run_dir / "samples"
            samples.mkdir(exist_ok=True)
            (samples / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return results

    def save(self, step: int, kind: str = "full") -> Path:
        from mhpo.trainer import checkpoint as ckpt

        self.logger.flush()
        records, tensors = to_state(self.pending)
        state = {
            "source": self.source.state_dict(),
            "pending": records,
            "before_rl": self.before,
            "warmup": self.warm_info,
            "config_hash": _cfg_hash(self.cfg),
            "wall_seconds": self.wall_seconds(),
        }
        pol = self.pol
        with self.stop.shield():
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                step,
                model=pol.model,
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

    def wall_seconds(self) -> float:
        """Wall time of the whole run, the stretches before a resume included."""
        return self.wall_before + time.perf_counter() - self.t_start

    def write_summary(self, after: dict, final: Path | None) -> dict:
        from mhpo.trainer import checkpoint as ckpt

        plots = []
        if self.cfg.train.plots:
            from mhpo.trainer.plots import plot_run

            plots = [str(p) for p in plot_run(self.run_dir)]
        summary = make_summary(
            self.cfg, self.run_dir, self.before, after, self.warm_info, self.wall_seconds(), plots, final
        )
        ckpt.atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary


def config_header() -> str:
    """The comment lines above a run's config.yaml: the values below are resolved, and for what machine."""
    from mhpo.models import machine_info

    m = machine_info()
    flags = ", ".join(m["cpu_flags"]) or "none of avx2/avx512/bf16"
    return (
        "# The config this run used: null / auto / 0 settings resolved (mhpo.trainer.defaults).\n"
        f"# Resolved on {m['cpu']} ({flags}; {m['cores']} cores), torch {m['torch']}"
        + (f", {m['cuda']}" if m["cuda"] else "")
        + ".\n"
    )


def _accuracy_line(label: str, results: dict, pass_k: int) -> str:
    line = f"{label}: held-out greedy accuracy {results['greedy/accuracy']:.1%}"
    return line + (f", pass@{pass_k} {results[f'pass@{pass_k}']:.1%}" if pass_k else "")


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers (saving and loading checkpoints)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _cfg_hash(cfg: Config) -> str:
    from mhpo.trainer.config import config_hash

    tree = to_dict(cfg)
    tree["train"] = {k: v for k, v in tree["train"].items() if f"train.{k}" not in RESUMABLE_CHANGES}
    return config_hash(tree)


def lr_factor(step: int, optim, total: int) -> float:
    """lr multiplier at RL step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant, or linear / cosine decay with progress p = (step - warmup) / (total - warmup) toward
    ``min_lr_ratio`` (reached after the last step, as in transformers' schedules):

        linear  lo + (1 - lo) (1 - p)        cosine  lo + (1 - lo) (1 + cos(pi p)) / 2
    """
    import math

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


# ---------------------------------------------------------------------------------------------
# One RL step.


def rl_step(plan: Plan, pol: Policy, source, pending, step: int, hold=contextlib.nullcontext) -> dict[str, float]:
    """RL step ``step``: sample and score the batches now due (:mod:`mhpo.trainer.pending`; with
    rollout.staleness = 0 exactly this step's), then update on this step's batch -> metrics.

    ``pending`` (a deque of ScoredBatch) carries the batches sampled for later steps. ``lr`` in the
    metrics is the rate this step used; the schedule steps after the update. ``hold()`` is entered
    before the update and left to the caller (interrupts are held from there until the caller has
    logged the step: :mod:`mhpo.trainer.interrupts`)."""
    from mhpo.trainer.pending import next_target
    from mhpo.trainer.update import policy_update

    cfg, timer = plan.cfg, StepTimer()
    last = min(step + cfg.rollout.staleness, cfg.train.steps)
    for target in range(next_target(pending, step), last + 1):
        pending.append(scored_batch(plan, pol, source, target, step - 1, timer))
    sb = pending.popleft()
    batch = update_batch(plan, pol, sb, timer)
    hold()
    with timer("update"):
        lr = pol.scheduler.get_last_lr()[0]
        lag = optimizer_steps(pol.optimizer) - sb.sampled_optimizer_steps
        result = policy_update(pol.model, pol.optimizer, batch, cfg.objective, cfg.update)
        pol.scheduler.step()
    if result.first_rows is not None:  # the first minibatch's entropy came from the update's own pass
        sb.entropy[sb.keep.nonzero().squeeze(-1)[result.first_rows]] = result.first_entropy
    staleness = {"staleness/policy_lag": float(step - 1 - sb.sampled_after), "staleness/optimizer_lag": float(lag)}
    return {**step_metrics(plan, pol, sb, lr, result.stats, timer), **staleness}


def scored_batch(plan: Plan, pol: Policy, source, target: int, steps_done: int, timer) -> ScoredBatch:
    """Sample the batch for RL step ``target`` with the current weights, score it, take its group
    advantages and behaviour log-probs (:func:`behaviour_logprobs`)."""
    import torch

    from mhpo.trainer.advantages import group_advantages
    from mhpo.trainer.pending import ScoredBatch

    cfg = plan.cfg
    with timer("rollout"), sampling_precision(cfg, pol):
        examples = source.next(cfg.rollout.prompts_per_step)
        rollout = sample_completions(plan, pol, examples)
    with timer("reward"):
        rows = [ex for ex in examples for _ in range(cfg.rollout.group_size)]
        ids = [row[keep].tolist() for row, keep in zip(rollout.completion_ids, rollout.completion_mask)]
        scores = plan.scorer.score(rows, rollout.completions, completion_ids=ids)
        rewards = torch.tensor(scores.total, dtype=torch.float32)  # [N]
        a = cfg.advantage
        adv, keep = group_advantages(rewards, cfg.rollout.group_size, a.estimator, a.eps, a.drop_zero_std)  # [N]
    with timer("logprobs"):
        old_logp, entropy, first_epoch, metrics = behaviour_logprobs(plan, pol, rollout, keep)
    n_opt = optimizer_steps(pol.optimizer)
    return ScoredBatch(
        target, steps_done, n_opt, rollout, scores, rewards, adv, keep, old_logp, entropy, first_epoch, metrics
    )


def sampling_precision(cfg: Config, pol: Policy):
    """The autocast of sampling: the run's (rollout.precision=same), or float32 / bf16 regardless."""
    import torch

    device = next(pol.model.parameters()).device
    if cfg.rollout.precision == "same":
        return contextlib.nullcontext()  # rl_step runs under the run's autocast already
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.rollout.precision == "bf16")


class StepTimer:
    """``with timer("phase"):`` records the phase's wall seconds; ``timer.total`` is their sum."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

        return timed()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def sample_completions(plan: Plan, pol: Policy, examples):
    """G sampled completions per prompt from the current policy (a Rollout of N = P * G rows)."""
    from mhpo.trainer.rollout import sample

    r = plan.cfg.rollout
    return sample(
        pol.model,
        pol.tokenizer,
        pol.encoder(examples),
        group_size=r.group_size,
        max_new_tokens=plan.max_new_tokens,
        eos_ids=pol.eos_ids,
        do_sample=True,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        batch_size=r.batch_size,
    )


def behaviour_logprobs(plan: Plan, pol: Policy, rollout, keep):
    """(old_logp [N, C], entropy [N, C] or None, first_epoch or None, metrics) of a fresh rollout.

    rollout.behaviour_logprobs = trainer: the current weights' log-probs by a no-grad pass at the
    run's precision. With staleness 0 the first minibatch's rows get theirs from their own forward
    pass in the update instead (the policy has not moved yet: ``UpdateBatch.first_epoch``; their
    entropy rows stay zero until the update returns them).
    rollout.behaviour_logprobs = sampler: the sampling pass's own log-probs; with log_mismatch, one
    trainer pass measures |log pi_trainer - log pi_sampler| (mean, p99, max over sampled tokens)."""
    import torch

    from mhpo.trainer.update import minibatches, rollout_logprobs

    cfg = plan.cfg
    temperature, micro = cfg.rollout.temperature, cfg.update.micro_batch_size
    mask = rollout.completion_mask
    if cfg.rollout.behaviour_logprobs == "sampler":
        if not cfg.rollout.log_mismatch:
            return rollout.logprobs, None, None, {}
        trainer_logp, entropy = rollout_logprobs(
            pol.model, rollout, temperature=temperature, entropy=True, micro_batch_size=micro
        )
        gap = (trainer_logp - rollout.logprobs)[mask].abs()  # [tokens]
        stats = {}
        if gap.numel():
            stats = {
                "mismatch/abs_log_ratio_mean": float(gap.mean()),
                "mismatch/abs_log_ratio_p99": float(torch.quantile(gap.double(), 0.99)),
                "mismatch/abs_log_ratio_max": float(gap.max()),
            }
        return rollout.logprobs, entropy, None, stats
    kept = keep.nonzero().squeeze(-1)  # [n]
    first_epoch = minibatches(len(kept), cfg.update.num_minibatches) if cfg.rollout.staleness == 0 else None
    in_first = torch.zeros(len(rollout), dtype=torch.bool)
    if first_epoch:
        in_first[kept[first_epoch[0]]] = True
    old_logp = torch.zeros(mask.shape, dtype=torch.float32)  # [N, C]
    entropy = torch.zeros_like(old_logp)
    rest = (~in_first).nonzero().squeeze(-1)
    if len(rest):
        part = rollout.select(rest, trim=False)
        old_logp[rest], entropy[rest] = rollout_logprobs(
            pol.model, part, temperature=temperature, entropy=True, micro_batch_size=micro
        )
    return old_logp, entropy, first_epoch, {}


def update_batch(plan: Plan, pol: Policy, sb: ScoredBatch, timer):
    """The UpdateBatch of a scored batch's kept rows, with the reference's log-probs when the
    objective needs them (frozen weights: the same whenever computed)."""
    from mhpo.trainer.update import UpdateBatch, rollout_logprobs

    cfg = plan.cfg
    kept = sb.keep.nonzero().squeeze(-1)  # [n]
    ref_logp = None
    if pol.reference is not None:
        with timer("logprobs"):
            r, micro = cfg.rollout, cfg.update.micro_batch_size
            ref_logp, _ = rollout_logprobs(pol.reference, sb.rollout, temperature=r.temperature, micro_batch_size=micro)
    return UpdateBatch(
        sb.rollout.select(kept, trim=False),
        sb.old_logp[kept],
        sb.advantages[kept],
        temperature=cfg.rollout.temperature,
        norm_length=float(plan.max_new_tokens),
        ref_logp=ref_logp[kept] if ref_logp is not None else None,
        first_epoch=sb.first_epoch,
    )


def step_metrics(plan, pol, sb: ScoredBatch, lr, update_stats, timer) -> dict[str, float]:
    """The step's metrics: the trained batch's rewards, lengths, entropy (when a trainer pass gave
    it), groups and sampling-time measures, the update's stats, timings."""
    from mhpo.trainer.advantages import zero_std_groups

    rollout, scores, rewards, adv = sb.rollout, sb.scores, sb.rewards, sb.advantages
    mask = rollout.completion_mask
    lengths = mask.sum(-1).float()
    n_tok = float(mask.sum())
    G = plan.cfg.rollout.group_size
    metrics: dict[str, float] = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        **{f"reward/{name}": sum(v) / len(v) for name, v in scores.per_function.items()},
        "reward/errors": float(scores.errors),
        "reward/timeouts": float(scores.timeouts),
        "accuracy": sum(scores.correct) / len(scores.correct),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response/truncated_frac": float(1.0 - _ended(rollout, pol.eos_ids).float().mean()),
        **({"entropy": float(sb.entropy.sum() / max(n_tok, 1.0))} if sb.entropy is not None else {}),
        "groups/zero_std_frac": float(zero_std_groups(rewards.view(-1, G)).float().mean()),
        "update/rows": float(sb.keep.sum()),
        "advantage/abs_mean": float(adv.abs().mean()),
        "lr": lr,
        **sb.metrics,
        **update_stats,
        "throughput/tokens_per_s": n_tok / max(timer.total, 1e-9),
        "time/step": timer.total,
        **{f"time/{phase}": seconds for phase, seconds in timer.seconds.items()},
    }
    if scores.messages:
        metrics["reward/first_error"] = scores.messages[0]  # type: ignore[assignment]
    return metrics


def _ended(rollout, eos_ids):
    import torch

    ids = rollout.completion_ids
    return (torch.isin(ids, torch.as_tensor(eos_ids)) & rollout.completion_mask).any(-1)


# ---------------------------------------------------------------------------------------------
# Progress and summary.


class _progress:
    """Progress of RL (reward, accuracy, step time) or the warm-up (probe accuracy): a rich bar on a
    terminal; without one (nohup, a scheduler, a log file) one plain line per RL step instead
    (nothing when disabled)."""

    def __init__(self, console, enabled: bool, total: int, start: int, label: str = "RL"):
        self.console, self.total, self.start, self.label = console, total, start, label
        self.enabled = enabled and console.is_terminal
        self.lines = enabled and not console.is_terminal and label == "RL"
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            fields = (
                "probe acc {task.fields[acc]}"
                if self.label != "RL"
                else "reward {task.fields[reward]}  acc {task.fields[acc]}  {task.fields[dt]} s/step"
            )
            self.progress = Progress(
                TextColumn(f"[bold]{self.label}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(fields),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=self.label != "RL",
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(
                self.label, total=self.total, completed=self.start, reward="-", acc="-", dt="-"
            )
        return self

    def __call__(self, step: int, metrics: dict, heldout: float | None = None) -> None:
        if self.lines:
            line = (
                f"step {step}/{self.total}  reward {metrics['reward/mean']:.3f}  train acc {metrics['accuracy']:.1%}"
                + (f"  held-out {heldout:.1%}" if heldout is not None else "")
                + f"  {metrics['time/step']:.2f} s/step"
            )
            self.console.print(line, markup=False, highlight=False)
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                reward=f"{metrics['reward/mean']:.3f}",
                acc=f"{metrics['accuracy']:.1%}",
                dt=f"{metrics['time/step']:.2f}",
            )

    def warmup(self, step: int, acc: float | None) -> None:
        if self.progress is not None:
            fields = {"acc": f"{acc:.1%}"} if acc is not None else {}
            self.progress.update(self.task, completed=step, **fields)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


def make_summary(
    cfg: Config,
    run_dir: Path,
    before: dict,
    after: dict,
    warm: dict,
    wall: float,
    plots: list[str],
    final: Path | None = None,
) -> dict:
    """The run's summary.json: "checkpoint" is the final checkpoint (None when train.final_checkpoint
    is none), "checkpoints" the names of every checkpoint left on disk."""
    from mhpo.models import machine_info
    from mhpo.trainer.checkpoint import complete_checkpoints

    size, k = cfg.eval.size, cfg.eval.pass_k
    out = {
        "complete": True,
        "accuracy_before_rl": before.get("greedy/accuracy"),  # None when eval.size = 0
        "accuracy_after_rl": after.get("greedy/accuracy"),
        "steps": cfg.train.steps,
        "wall_seconds": round(wall, 2),
        "objective": cfg.objective.name,
        "task": cfg.task.name,
        "model": cfg.model.name_or_path,
        "seed": cfg.seed,
        "precision": cfg.model.dtype,
        "lr": cfg.optim.lr,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "eval_max_new_tokens": cfg.eval.max_new_tokens,
        "threads": cfg.train.threads,
        "machine": machine_info(),
        "heldout_size": size,
        "warmup": warm,
        "run_dir": str(run_dir),
        "checkpoint": str(final) if final is not None else None,
        "checkpoints": [d.name for _, d in complete_checkpoints(run_dir / "checkpoints")],
        "metrics": str(run_dir / "metrics.jsonl"),
        "evals": str(run_dir / "evals.jsonl") if _nonempty(run_dir / "evals.jsonl") else None,
        "tensorboard": str(run_dir / "tensorboard") if "tensorboard" in cfg.train.report_to else None,
        "trackers": list(cfg.train.report_to),
        "plots": plots,
        "config_hash": _cfg_hash(cfg),
    }
    if k and size:
        out[f"pass@{k}_before_rl"] = before.get(f"pass@{k}")
        out[f"pass@{k}_after_rl"] = after.get(f"pass@{k}")
    return out


def print_summary(summary: dict, file=None) -> None:
    lines = [
        "",
        f"mhpo train: {summary['objective']} on {summary['task']} (model {summary['model']}, "
        f"{summary.get('precision', '?')}, seed {summary['seed']})",
    ]
    w = summary.get("warmup") or {}
    if w:
        lines.append(
            f"  warm-up          {_plural(w.get('steps'), 'supervised step')}, probe accuracy "
            f"{w.get('probe_accuracy', 0):.1%}" + (" (reused from cache)" if w.get("reused") else "")
        )
    if summary.get("accuracy_before_rl") is None:
        lines.append(f"  RL               {_plural(summary['steps'], 'step')}, no held-out evaluation (eval.size=0)")
    else:
        lines.append(
            f"  held-out greedy  {summary['accuracy_before_rl']:.1%} before RL -> {summary['accuracy_after_rl']:.1%} "
            "after "
            f"{_plural(summary['steps'], 'RL step')} ({_plural(summary['heldout_size'], 'problem')})"
        )
    for key in summary:
        if key.startswith("pass@") and key.endswith("_before_rl") and summary[key] is not None:
            name = key[: -len("_before_rl")]
            lines.append(f"  held-out {name:<7} {summary[key]:.1%} -> {summary[name + '_after_rl']:.1%}")
    lines += [
        f"  wall time        {summary['wall_seconds']:.0f} s",
        f"  outputs          {summary['run_dir']}/ ({', '.join(written_outputs(summary))})",
    ]
    print("\n".join(lines), file=file or sys.stdout)


def _plural(n, word: str) -> str:
    """'1 problem', '2 problems' (and 'None problems' never: a missing count prints as '?')."""
    return f"{'?' if n is None else n} {word}{'' if n == 1 else 's'}"


def written_outputs(summary: dict) -> list[str]:
    """The outputs a run wrote, as listed by print_summary: no tensorboard/, plots/ or checkpoints/
    when those were off or empty."""
    out = (
        ["metrics.jsonl"]
        + (["evals.jsonl"] if summary.get("evals") else [])
        + (["samples/"] if summary.get("heldout_size") else [])
    )
    out += ["tensorboard/"] if summary.get("tensorboard") else []
    out += ["plots/"] if summary.get("plots") else []
    out += (
        ["checkpoints/"]
        if summary.get("checkpoints", [summary.get("checkpoint")] if summary.get("checkpoint") else [])
        else []
    )
    return out + ["summary.json"]


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0
