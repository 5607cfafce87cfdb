"""The run configuration: typed dataclasses, one YAML file, dotted command-line overrides.

    config = load_config("run.yaml", ["objective.name=grpo", "rollout.group_size=16"])

Precedence: the defaults of the dataclasses below (the one place they live; ``mhpo train
--print-config`` shows them as commented YAML) < the YAML file < the overrides. OmegaConf merges
them (dotted keys, ``+key=value``, ``${a.b}`` interpolation, as in verl and Hydra). Every key is
then checked against the dataclasses: an unknown key, a value of the wrong type or out of range
raises :class:`ConfigError` with one line naming the key, the bad value and the valid choices.
Semantic checks that need the registries (objective hparams, task and reward names, model path)
live in :func:`mhpo.trainer.setup.prepare_run`, which also runs before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Union

import yaml

from mhpo.errors import did_you_mean
from mhpo.rules import RULES


class ConfigError(ValueError):
    """A bad config key or value; the message is one line meant for the user."""


def _f(default, check: str | None = None, help: str = ""):
    """A dataclass field with a range rule (a :data:`mhpo.rules.RULES` key) and a one-line gloss."""
    if isinstance(default, (dict, list)):
        return field(
            default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"check": check, "help": help}
        )
    return field(default=default, metadata={"check": check, "help": help})


@dataclass
class TinyModelConfig:
    hidden_size: int = _f(128, ">=1", "hidden width")
    num_layers: int = _f(2, ">=1", "decoder layers")
    num_heads: int = _f(4, ">=1", "attention heads")
    num_kv_heads: int = _f(2, ">=1", "key/value heads (GQA)")
    intermediate_size: int = _f(512, ">=1", "MLP width")
    max_positions: int = _f(256, ">=1", "maximum sequence length")


@dataclass
class TinyVisionConfig:
    image_size: int = _f(56, ">=1", "images are resized to image_size^2 pixels (a multiple of patch_size * 2)")
    patch_size: int = _f(14, ">=1", "vision patch side in pixels")
    depth: int = _f(1, ">=1", "vision transformer blocks")
    hidden_size: int = _f(64, ">=1", "vision width")
    num_heads: int = _f(2, ">=1", "vision attention heads")
    intermediate_size: int = _f(128, ">=1", "vision MLP width")


@dataclass
class LoraConfig:
    rank: int = _f(0, ">=0", "LoRA rank r (0: off, full fine-tuning); only the adapters train")
    alpha: float | None = _f(
        None, ">0", "LoRA updates are scaled by alpha / rank (null: 2 x rank, a scale of 2 at any rank)"
    )
    dropout: float = _f(0.0, "[0,1)", "dropout on the adapters' input")
    target_modules: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="names of the linear modules that get adapters (matched against the last part of each module "
        "name), or [all-linear] (every linear layer but the output head)",
    )
    merge: bool = _f(False, help="write the final checkpoint as merged full weights (kind model: a plain HF model)")


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "tiny",
        help="'tiny' (built-in tiny Qwen2 + char tokenizer), 'tiny-vlm' (tiny Qwen2.5-VL), "
        "a named model (smollm2-135m-instruct), a .gguf file, a local dir or a hub id",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-mixed"] = _f(
        "auto", help="auto: bf16 on a GPU that has it, bf16-mixed on a CPU with native bf16 matmuls, else fp32"
    )
    device: str = _f("auto", help="auto | cpu | cuda | cuda:N | mps")
    chat_template: Literal["auto", "on", "off"] = _f(
        "auto", help="auto: apply the tokenizer's chat template when it has one"
    )
    trust_remote_code: bool = _f(False, help="passed to from_pretrained")
    attn_implementation: str | None = _f(None, help="passed to from_pretrained (e.g. sdpa, eager)")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    vision: TinyVisionConfig = field(default_factory=TinyVisionConfig)  # tiny-vlm's vision tower
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = _f(
        False, help="recompute activations in the update's backward pass (less memory, about one more forward)"
    )


@dataclass
class TaskConfig:
    name: str = _f("addition", help="a procedural task, 'rg:<reasoning-gym dataset>', or 'dataset' (with path)")
    args: dict = _f({}, help="task arguments (procedural: e.g. digits; rg: the dataset's config fields)")
    path: str | None = _f(None, help="dataset: a .jsonl / .parquet file, a saved HF dataset dir or a hub id")
    prompt_column: str = _f("prompt", help="dataset column with the prompt (text or chat messages)")
    answer_column: str = _f("answer", help="dataset column with the reference answer")
    split: str = _f("train", help="dataset split to train on")
    eval_split: str | None = _f(None, help="held-out split; default: hold out eval.size rows of the train split")
    train_size: int = _f(10000, ">=1", "rows generated for reasoning-gym tasks")
    system_prompt: str | None = _f(None, help="system message for chat models")


@dataclass
class RewardsConfig:
    functions: list = _f(
        ["auto"],
        help="auto (the task's verifier), exact_match, last_number, math_verify, reasoning_gym, module:function, "
        "file.py:function",
    )
    weights: list | None = _f(None, help="one weight per function (default 1 each)")
    timeout_s: float = _f(10.0, ">0", "hard time limit per scored completion (the worker is killed and respawned)")
    max_error_frac: float = _f(
        0.5,
        "(0,1]",
        "stop when a function fails on more than this share of its completions over error_window batches (1: never)",
    )
    error_window: int = _f(20, ">=1", "scoring batches (one per RL step) in the error-budget window")


@dataclass
class RolloutConfig:
    prompts_per_step: int = _f(32, ">=1", "prompts drawn per RL step")
    group_size: int = _f(8, ">=2", "completions sampled per prompt (G)")
    max_new_tokens: int | None = _f(None, ">=1", "null: the task's budget (a dataset task: 256)")
    temperature: float = _f(1.0, ">0", "sampling temperature (log-probs are those of the tempered policy)")
    top_p: float = _f(1.0, "(0,1]", "nucleus sampling (1: off)")
    top_k: int = _f(0, ">=0", "0 = off (true temperature sampling)")
    batch_size: int | None = _f(None, ">=1", "rows per generate call (default: all)")
    staleness: int = _f(
        0, ">=0", "asynchronous RL: train at step t on the batch sampled k steps earlier (mhpo.trainer.pending)"
    )
    behaviour_logprobs: Literal["auto", "trainer", "sampler"] = _f(
        "auto",
        help="trainer: log pi_old recomputed by the trainer at sampling time; sampler: the sampling pass's own "
        "(as async engines take them from the inference engine); auto: sampler where both run float32 (equal "
        "within rounding, and no extra pass), trainer otherwise",
    )
    precision: Literal["same", "float32", "bf16"] = _f(
        "same",
        help="sampling precision: same as the run's, or float32 / bf16 autocast (with behaviour_logprobs="
        "sampler: a training-inference mismatch)",
    )
    log_mismatch: bool | None = _f(
        None,
        help="with sampler log-probs: one no-grad trainer pass per batch to log |log pi_trainer - log pi_sampler| "
        "(null: on unless sampler and trainer both run float32, where there is none to measure)",
    )


@dataclass
class AdvantageConfig:
    estimator: Literal["grpo", "dr_grpo"] = _f("grpo", help="grpo: (R-mean)/(std+eps); dr_grpo: R-mean")
    eps: float = _f(1e-4, ">0", "std floor term for grpo")
    drop_zero_std: bool = _f(False, help="drop groups whose rewards are all equal from the update")


@dataclass
class ObjectiveConfig:
    name: str = _f("mhpo", help="any registered objective (mhpo objectives)")
    hparams: dict = _f({}, help="objective hyper-parameters (validated by the objective)")
    agg: str = _f("token-mean", help="token-mean | seq-mean-token-mean | seq-mean-token-sum-norm")
    beta: float = _f(0.0, ">=0", "KL coefficient to a frozen reference (the RL-initial policy)")
    log_kl: bool = _f(False, help="compute KL to the reference even when beta = 0 (costs a forward pass)")


@dataclass
class UpdateConfig:
    num_minibatches: int = _f(2, ">=1", "optimizer steps per rollout batch and epoch")
    epochs: int = _f(1, ">=1", "passes over each rollout batch")
    micro_batch_size: int | None = _f(
        None, ">=1", "most rows per forward/backward (default: the minibatch; rows are grouped by completion length)"
    )
    micro_batch_tokens: int | None = _f(
        None,
        ">=1",
        "most positions per forward/backward (rows x longest completion + distinct prompts x prompt width; "
        "bounds activation memory; a longer single row runs alone; each micro-batch runs its own prompts; "
        "null: no bound, and a minibatch's prompts run once for all its micro-batches)",
    )
    max_grad_norm: float = _f(1.0, ">0", "clip the global grad norm of each optimizer step to this")
    minibatch_order: Literal["rows", "groups"] = _f(
        "rows",
        help="rows: each row shuffled into a minibatch on its own (TRL's order); groups: whole groups shuffled, "
        "a group's rows in one minibatch (its prompt then runs once per epoch in the update, not once per "
        "minibatch; each optimizer step sees fewer distinct prompts)",
    )


@dataclass
class OptimConfig:
    lr: float | None = _f(
        None,
        ">0",
        "AdamW lr (null: 2e-4 for the built-in tiny models, measured on the demo; 1e-6 for a pretrained model, "
        "TRL's and verl's default)",
    )
    weight_decay: float = _f(0.0, ">=0", "AdamW weight decay")
    beta1: float = _f(0.9, "[0,1)", "AdamW beta1")
    beta2: float = _f(0.999, "[0,1)", "AdamW beta2")
    eps: float = _f(1e-8, ">0", "AdamW eps")
    warmup_steps: int = _f(0, ">=0", "linear lr warm-up (RL steps)")
    schedule: Literal["constant", "linear", "cosine"] = _f("constant", help="lr decay after warm-up")
    min_lr_ratio: float = _f(0.0, "[0,1]", "final lr / lr for linear and cosine")


@dataclass
class WarmupConfig:
    enabled: Literal["auto", "on", "off"] = _f("auto", help="auto: on for the built-in tiny model only")
    lr: float = _f(2e-3, ">0", "AdamW lr of the supervised warm-up (linear warm-up, then constant)")
    lr_warmup_steps: int = _f(100, ">=0", "linear lr warm-up of the supervised steps")
    weight_decay: float = _f(0.1, ">=0", "AdamW weight decay of the warm-up")
    beta2: float = _f(0.98, "[0,1)", "AdamW beta2")
    batch_size: int = _f(64, ">=1", "examples per supervised step")
    threshold: float = _f(0.2, "[0,1]", "stop when greedy accuracy on the probe set reaches this")
    max_steps: int = _f(1500, ">=1", "cap on supervised steps")
    eval_every: int = _f(25, ">=1", "probe every N steps")
    eval_size: int = _f(256, ">=1", "probe set size (drawn like the held-out set, disjoint from it)")
    cache_dir: str | None = _f(None, help="where warm-up checkpoints are cached by config hash (default: <run>/warmup)")


@dataclass
class EvalConfig:
    size: int | None = _f(
        None,
        ">=0",
        "held-out set size, fixed across seeds (0: no held-out evaluation; "
        "null: 200 for the built-in tiny models, 32 for a pretrained model)",
    )
    seed: int = _f(2024, ">=0", "seed of the held-out set")
    every: int = _f(50, ">=0", "evaluate every N RL steps (0: only before and after)")
    pass_k: int | None = _f(
        None,
        ">=0",
        "pass@k by sampling k completions per prompt (0: off; null: 8 for the "
        "built-in tiny models, 0 for a pretrained model)",
    )
    max_new_tokens: int | None = _f(None, ">=1", "held-out completion budget (null: the rollout's)")
    temperature: float = _f(1.0, ">0", "sampling temperature of pass@k")
    batch_size: int = _f(512, ">=1", "rows per generate call")
    benchmarks: list = _f(
        [], help="benchmark names or local files evaluated at every evaluation (as mhpo eval --benchmarks)"
    )
    benchmark_samples: int = _f(4, ">=1", "samples per benchmark problem (Avg@k, pass@k, maj@k)")
    benchmark_limit: int | None = _f(None, ">=1", "first N problems of each benchmark (null: all)")
    benchmark_max_new_tokens: int | None = _f(None, ">=1", "null: the run's max_new_tokens")
    benchmark_data_dir: str | None = _f(None, help="local copies of named benchmarks (DIR/<name>[.jsonl|.parquet])")


@dataclass
class TrainConfig:
    steps: int = _f(250, ">=0", "RL steps")
    checkpoint_every: int = _f(50, ">=0", "0: only at the end")
    keep_checkpoints: int = _f(2, ">=1", "periodic checkpoints kept (the oldest are deleted)")
    final_checkpoint: Literal["full", "model", "none"] = _f(
        "full", help="after the last step: full (resumable) | model (HF model + tokenizer only) | none"
    )
    save_optimizer: bool = _f(
        True, help="false: checkpoints skip optimizer.safetensors (a resume from one restarts AdamW, with a warning)"
    )
    threads: int = _f(0, ">=0", "torch CPU threads (0: 1 for the built-in tiny models, else the usable cores up to 8)")
    progress: bool = _f(True, help="rich progress bar")
    report_to: list = _f(["tensorboard"], help="trackers besides metrics.jsonl: tensorboard | wandb | trackio")
    plots: bool = _f(True, help="PNG plots of reward, accuracy and grad norm in <run>/plots")


@dataclass
class Config:
    seed: int = _f(0, ">=0", "run seed: initialisation, data order, sampling")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Loading and overriding.


def packaged_configs() -> list[str]:
    """Names of the packaged configs (``mhpo/configs/<name>.yaml``), e.g. default, vlm."""
    folder = resources.files("mhpo").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(path: str | Path):
    """A config path as given, or the packaged config of that name when ``path`` is a bare name
    (no directory, no suffix) that is not an existing file: ``vlm`` -> ``mhpo/configs/vlm.yaml``."""
    p = Path(path)
    if p.exists() or p.suffix or len(p.parts) != 1:
        return p
    name = p.name
    if name not in packaged_configs():
        raise ConfigError(
            f"config {name!r} is neither a file nor a packaged config{did_you_mean(name, packaged_configs())}; "
            f"packaged configs: {', '.join(packaged_configs())}"
        )
    return resources.files("mhpo").joinpath(f"configs/{name}.yaml")


def read_yaml(path: str | Path) -> dict:
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def check_override(text: str) -> str:
    """The dotted key of ``key.subkey=value`` (``+key.subkey=value`` adds a key, as in Hydra), or
    ConfigError naming the override."""
    key = text.partition("=")[0].removeprefix("+")
    if "=" not in text or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key.subkey=value (e.g. rollout.group_size=16)")
    return key


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The dataclass defaults < YAML file < dotted overrides, then validation. Raises ConfigError.

    ``path`` may also name a packaged config (``"vlm"``, see :func:`resolve_config_path`).
    Merging, overrides and ``${a.b}`` interpolation are OmegaConf's (the syntax of verl and Hydra);
    the checks and their one-line errors are :func:`from_dict`'s.
    """
    layers = [to_dict(Config())]
    if path is not None:
        layers.append(migrate(read_yaml(path)))
    return from_dict(merge_layers(layers, overrides))


def with_overrides(config: Config, overrides) -> Config:
    """``config`` with dotted overrides applied (validated again)."""
    return from_dict(merge_layers([to_dict(config)], overrides))


def merge_layers(layers: list[dict], overrides=()) -> dict:
    """OmegaConf: merge the trees in order, then each dotted override; interpolations resolved.
    ConfigError names the override that does not parse."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def first_line(err: Exception) -> str:
        return " ".join(str(err).split("\n")[0].split()) or type(err).__name__

    try:
        merged = OmegaConf.merge(*(OmegaConf.create(layer) for layer in layers))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {first_line(err)}") from None
    for text in overrides:
        check_override(text)
        try:  # the value is parsed as YAML, as in Hydra and verl
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([text.removeprefix("+")]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(f"override {text!r} does not parse: {first_line(err)}") from None
    try:
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {first_line(err)}") from None


def from_dict(tree: dict) -> Config:
    return _build(Config, migrate(tree), "")


def migrate(tree: dict) -> dict:
    """Keys renamed since a run directory was written, read in their new form:
    ``train.tensorboard: true | false`` -> ``train.report_to: [tensorboard] | []``."""
    train = tree.get("train")
    if isinstance(train, dict) and "tensorboard" in train and "report_to" not in train:
        train = dict(train)
        tree = {**tree, "train": train}
        train["report_to"] = ["tensorboard"] if train.pop("tensorboard") else []
    return tree


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def save_config(config, path: str | Path, header: str = "") -> None:
    """``config`` as YAML, after ``header`` (comment lines)."""
    Path(path).write_text(header + to_yaml(config))


def commented_yaml(config) -> str:
    """``config`` as YAML, each key followed by its gloss and range rule (the fields' metadata)."""

    def lines(obj, indent: str) -> list[str]:
        out = []
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out += [f"{indent}{f.name}:", *lines(value, indent + "  ")]
                continue
            text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            notes = [f.metadata.get("help"), f.metadata.get("check"), " | ".join(choices)]
            notes = [n for n in notes if n]
            out.append(f"{indent}{text}" + (f"  # {'; '.join(notes)}" if notes else ""))
        return out

    return "\n".join(lines(config, "")) + "\n"


def config_hash(tree: dict) -> str:
    """Short stable hash of a JSON-able tree (key order does not matter)."""
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Structural validation.


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config key {where or '(top level)'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{where}.{key}" if where else str(key)
            section = f"in {where!r}" if where else "at the top level"
            raise ConfigError(
                f"unknown config key {full!r}{did_you_mean(key, names)}; valid keys {section}: {', '.join(names)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        full = f"{where}.{f.name}" if where else f.name
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], full, f.metadata.get("check"))
    return cls(**kwargs)


def _coerce(tp, value, where: str, check: str | None):
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, check)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "on" in choices:  # YAML reads on/off as booleans
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(
                f"config key {where!r} has invalid value {value!r}{did_you_mean(value, choices)}; "
                f"valid choices: {', '.join(map(str, choices))}"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {where!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"config key {where!r} must be an integer, got {value!r}")
        return _check_range(value, where, check)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {where!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"config key {where!r} must be a finite number, got {value!r}")
        return _check_range(value, where, check)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key {where!r} must be a non-empty string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key {where!r} must be a list, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in the dataclasses above


def _check_range(value, where: str, check: str | None):
    if check is None:
        return value
    ok, text = RULES[check]
    if not ok(value):
        raise ConfigError(f"config key {where!r}={value!r} is out of range; it must be {text}")
    return value
