"""Attention for text models on a CPU: PyTorch SDPA with grouped-query heads shared inside the
kernel, and float32 math under bf16 autocast.

    softmax(q k^T / sqrt(d) + mask) v     q [B, H, Lq, d], k / v [B, Hkv, Lk, d], Hkv | H

transformers' ``sdpa`` attention copies every key and value head H / Hkv times (``repeat_kv``)
whenever a padding mask is present, which a batch of left-padded prompts always has: in a decode
step of SmolLM2-135M (9 query heads, 3 key/value heads) at batch 64 that is a copy of the whole KV
cache, three times over, in each of 30 layers (4.0 s of a 26 s evaluation run on a 2-core AMD EPYC).
``enable_gqa=True`` lets the kernel share the heads instead (PyTorch >= 2.5). And PyTorch's CPU SDPA
kernels ran bf16 at about half their float32 speed (same CPU, torch 2.13: 1.3 ms against 0.3 ms a
layer in a decode step at batch 32; forward + backward at 16 x 110 tokens 44 ms against 25 ms), while
the matmuls around attention are what bf16 speeds up, so under bf16 autocast q / k / v are cast to
float32 here and the output back (the more accurate choice as well).

:func:`use_cpu_attention` switches a loaded text model whose attention is transformers' ``sdpa`` to
:func:`cpu_sdpa` (registered with transformers' ``AttentionInterface`` as ``mhpo_cpu_sdpa``, with
``sdpa``'s mask builder); other implementations and vision-language models are left alone.
"""

from __future__ import annotations

import torch

NAME = "mhpo_cpu_sdpa"


def cpu_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **_):
    """``F.scaled_dot_product_attention`` with ``enable_gqa`` (no repeated key / value heads), in
    float32 when any of q / k / v is bf16 (autocast off inside; the output is then bf16), as
    transformers' ``sdpa_attention_forward`` calls it otherwise. Shapes: q [B, H, Lq, d], k / v
    [B, Hkv, Lk, d], mask [B, 1, Lq, Lk] bool or None -> ([B, Lq, H, d], None)."""
    low = torch.bfloat16 in (query.dtype, key.dtype, value.dtype)  # (under autocast RoPE may promote q, k only)
    dtype = torch.bfloat16 if low else query.dtype
    if low:
        query, key, value = query.float(), key.float(), value.float()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal  # as transformers decides it
    with torch.autocast(query.device.type, enabled=False):
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous().to(dtype), None


def use_cpu_attention(model) -> bool:
    """Switch a text model's ``sdpa`` attention to :func:`cpu_sdpa`; True when switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, cpu_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # without it transformers builds no mask at all
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "vision_config", None) is not None:
        return False
    model.set_attn_implementation(NAME)
    return True
