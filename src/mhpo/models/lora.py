"""LoRA adapters (peft) on a causal LM: apply, save, load, merge; and gradient checkpointing.

    model = apply_lora(model, rank=16, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj"], base="tiny")
    save_adapter(model, ckpt_dir)          adapter_model.safetensors + adapter_config.json
    model = load_adapter(base_model, ckpt_dir)
    plain = merged(model)                  a copy with the adapters folded into the weights

peft is imported only here and only when a function needs it (LoRA is off by default). Adapter
weights are written and read with safetensors (never a pickle), the adapter config as JSON, so a
checkpoint's manifest covers both. ``adapter_config.json`` names the base model
(``base_model_name_or_path``): what ``mhpo eval --model CKPT`` loads the adapters onto.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"


def is_peft(model) -> bool:
    """Whether ``model`` is a peft model (adapters attached)."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def unwrap(model):
    """The transformers model under a peft wrapper (adapters stay injected in its layers); ``model`` itself
    when it has no wrapper."""
    return model.get_base_model() if is_peft(model) else model


def linear_module_names(model) -> list[str]:
    """Sorted last name parts of the model's linear layers, the output head excluded (q_proj, v_proj, ...)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in inner.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name
    }
    return sorted(names)


def check_target_modules(model, target_modules: list[str]) -> None:
    """ValueError naming the first entry of model.lora.target_modules that matches no linear layer of
    ``model``, with the model's linear module names."""
    names = linear_module_names(model)
    for target in target_modules:
        if target == ALL_LINEAR:
            continue
        if target not in names:
            raise ValueError(
                f"model.lora.target_modules: {target!r} matches no linear module of this model; "
                f"its linear modules: {', '.join(names)} (or {ALL_LINEAR})"
            )


def apply_lora(model, *, rank: int, alpha: float, dropout: float, target_modules: list[str], base: str):
    """``model`` with fresh LoRA adapters (A random, B zero: the output is the base model's until the
    first update) on ``target_modules``; every other weight frozen. ``base`` is recorded in the adapter
    config as the base model's source. ValueError when a target module matches nothing."""
    check_target_modules(model, target_modules)
    from peft import LoraConfig, get_peft_model

    targets = ALL_LINEAR if ALL_LINEAR in target_modules else list(target_modules)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def adapter_config(model) -> dict:
    """The JSON-able adapter config of a peft model (sets written as sorted lists)."""
    config = model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def save_adapter(model, directory: Path) -> None:
    """Write the adapter weights (safetensors) and config (JSON) of peft ``model`` into ``directory``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model), indent=1, sort_keys=True) + "\n")


def save_weights(model, directory: Path) -> None:
    """A model's weights into ``directory``: the adapters alone for a peft model, else ``save_pretrained``."""
    if is_peft(model):
        save_adapter(model, directory)
    else:
        model.save_pretrained(directory)


def adapter_base(directory) -> str | None:
    """The base model an adapter directory names (None: ``directory`` holds no adapters)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{path} is not a valid adapter config") from None
    if not base:
        raise ValueError(f"{path} names no base model (base_model_name_or_path)")
    return base


def load_adapter(model, directory):
    """``model`` with the adapters saved in ``directory`` (:func:`save_adapter`) attached, trainable.
    ValueError when the weights do not fit the model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    config = LoraConfig.from_pretrained(str(directory))
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    expected = set(get_peft_model_state_dict_keys(peft_model))
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[:3]
        raise ValueError(f"the adapters in {directory} do not fit the base model (e.g. {', '.join(odd)})")
    set_peft_model_state_dict(peft_model, state)
    return peft_model


def get_peft_model_state_dict_keys(model) -> list[str]:
    """The keys :func:`save_adapter` writes for peft ``model``."""
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model))


def merged(model):
    """A plain transformers model: a copy of peft ``model`` with its adapters folded into the weights
    (``model`` itself keeps training unchanged)."""
    return copy.deepcopy(model).merge_and_unload()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints: no need for
    inputs that require grad, so frozen embeddings under LoRA are fine). Checkpointing applies only in
    training mode; sampling runs in eval mode and keeps its KV cache."""
    unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
