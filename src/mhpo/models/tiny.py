"""Tiny models built locally (no download): the offline default's Qwen2-architecture policy and its
character tokenizer, seeded so that a run's initial weights depend on its seed only."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from mhpo.models.tokens import neutral_generation_config


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
    Qwen2 model of :func:`tiny_qwen2`, and the language model of :func:`mhpo.models.vlm.tiny_qwen2_5_vl`."""
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


def build_tiny(tiny_cfg, seed: int):
    """(model, tokenizer): the char tokenizer and a freshly initialised tiny Qwen2 (seeded)."""
    from mhpo.models.tokenizer import build_char_tokenizer

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
