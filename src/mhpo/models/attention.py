"""Attention in float32 under bf16 autocast on a CPU.

    softmax(q k^T / sqrt(d) + mask) v    with q, k, v cast to float32, the output cast back to q's dtype

PyTorch's CPU SDPA kernels ran bf16 attention at about half their float32 speed (2-core AMD EPYC with
AVX512-BF16, torch 2.13: a decode step of SmolLM2-135M at batch 32 spent 1.3 ms per layer in bf16
attention against 0.3 ms in float32; forward + backward at 16 x 110 tokens 44 ms against 25 ms), while
the matmuls around it are what bf16 speeds up. The attention's share of the FLOPs is small, so doing it
in float32 costs little arithmetic and is the more accurate choice. :func:`use_float32_attention`
switches a loaded model whose attention is transformers' ``sdpa`` to this function (registered with
transformers' ``AttentionInterface`` as ``float32_sdpa``); other implementations are left alone.
"""

from __future__ import annotations

import torch

NAME = "float32_sdpa"


def float32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa_attention_forward`` on float32 q / k / v (autocast off inside); the
    output in ``query``'s dtype. Shapes: q [B, H, Lq, D], k / v [B, Hkv, Lk, D] -> out [B, Lq, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        out, weights = sdpa_attention_forward(module, q, k, v, attention_mask, **kwargs)
    return out.to(dtype), weights


def use_float32_attention(model) -> bool:
    """Switch ``model`` (and its sub-models) from ``sdpa`` to :func:`float32_sdpa`; True when switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, float32_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # without it transformers builds no mask at all
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
