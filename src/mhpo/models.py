"""Tiny models built locally (no download): the offline default's Qwen2-architecture policy."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM


def tiny_text_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_positions: int = 256,
) -> dict:
    """Config fields of the tiny decoder (tied embeddings, the tokenizer's special ids): the whole
    Qwen2 model of :func:`tiny_qwen2`, and the language model of :func:`mhpo.vlm.tiny_qwen2_5_vl`."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def seeded_init(model_class, config, seed: int):
    """``model_class(config)`` with weights drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def tiny_qwen2(tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **sizes) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM (~0.5M parameters at the defaults), tied embeddings;
    ``sizes`` are :func:`tiny_text_config`'s (hidden_size, num_layers, ...)."""
    return seeded_init(Qwen2ForCausalLM, Qwen2Config(**tiny_text_config(tokenizer, **sizes)), seed)


# ---------------------------------------------------------------------------------------------
# Loading a policy for training: the built-in tiny model or any causal LM (local dir or hub id).

TINY = "tiny"
TINY_VLM = "tiny-vlm"  # the built-in tiny Qwen2.5-VL (see mhpo.vlm)
BUILT_IN = (TINY, TINY_VLM)  # model names built locally (random init, warmed up by default)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else mps if available, else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"model.device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device {name!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_source(name_or_path: str) -> None:
    """ValueError (one line) unless ``name_or_path`` is built in ('tiny', 'tiny-vlm'), a model
    directory, or a hub id that can be fetched (in offline mode: that is already in the local Hugging
    Face cache)."""
    import os
    from pathlib import Path

    if name_or_path in BUILT_IN:
        return
    path = Path(name_or_path).expanduser()
    local_looking = name_or_path.startswith((".", "/", "~")) or path.exists()
    if local_looking:
        if not path.is_dir():
            raise ValueError(f"model {name_or_path!r} is not a directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {name_or_path!r} has no config.json (not a transformers model)")
        return
    parts = name_or_path.split("/")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"model {name_or_path!r} is neither built in ({', '.join(BUILT_IN)}), a local directory, nor a hub id like org/name")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(found, str):
            raise ValueError(
                f"model {name_or_path!r} is not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
            )


def neutral_generation_config(model) -> None:
    """Replace the model's generation defaults (sampling presets, penalties) by neutral ones, keeping
    its special token ids, so that only the sampling settings the trainer passes take effect."""
    from transformers import GenerationConfig

    old = getattr(model, "generation_config", None)
    keep = {k: getattr(old, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}
    model.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})


def build_tiny(tiny_cfg, seed: int):
    """(model, tokenizer): the char tokenizer and a freshly initialised tiny Qwen2 (seeded)."""
    from .tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = tiny_qwen2(
        tokenizer,
        hidden_size=tiny_cfg.hidden_size,
        num_layers=tiny_cfg.num_layers,
        num_heads=tiny_cfg.num_heads,
        num_kv_heads=tiny_cfg.num_kv_heads,
        intermediate_size=tiny_cfg.intermediate_size,
        max_positions=tiny_cfg.max_positions,
        seed=seed,
    )
    neutral_generation_config(model)
    return model, tokenizer


def load_pretrained(path: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """(model, tokenizer) from a local directory or hub id; pad token defaults to EOS.

    A vision-language model (its config has a ``vision_config``, e.g. Qwen2.5-VL or a tiny-vlm
    checkpoint) is loaded with :func:`mhpo.vlm.load_pretrained_vlm` and comes with its processor in
    place of the tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "vision_config", None) is not None:
        from .vlm import load_pretrained_vlm

        return load_pretrained_vlm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                   attn_implementation=attn_implementation)

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    neutral_generation_config(model)
    return model, tokenizer
