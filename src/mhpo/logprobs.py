"""Per-token log-probabilities (and entropy) of sampled tokens under a causal LM.

    logp_t = log softmax(h_t W^T / temperature)[y_t],   H_t = -sum_v p_tv log p_tv

`token_logprobs` works from final hidden states and the output-embedding matrix; `model_logprobs`
runs a Hugging Face causal LM's base model and scores the completion part of each row.
"""

from __future__ import annotations

import torch


def token_logprobs(
    hidden: torch.Tensor,  # [..., H] final hidden states at the positions that predict `targets`
    weight: torch.Tensor,  # [V, H] output embedding (lm_head) matrix
    targets: torch.Tensor,  # [...] token ids
    *,
    bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([...] float32, [...] float32 | None)
    """Reference path: materialises the [..., V] logits. Log-probs and entropy in float32."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [..., V]
    logz = torch.logsumexp(logits, dim=-1)  # [...]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    ent = None
    if entropy:
        p = torch.softmax(logits, dim=-1)
        ent = logz - (p * logits).sum(-1)
    return logp, ent


def model_logprobs(
    model,
    input_ids: torch.Tensor,  # [B, L] prompt (left-padded to width P) + completion
    attention_mask: torch.Tensor,  # [B, L]
    prompt_width: int,  # P: completion tokens are input_ids[:, P:]
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    **model_inputs,  # extra inputs for the base model (e.g. pixel_values for a VLM)
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([B, L-P], [B, L-P] | None)
    """Log-probs of the completion tokens, from the base model's hidden states (no full logits)."""
    base = getattr(model, model.base_model_prefix)
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
    hidden = out.last_hidden_state[:, prompt_width - 1 : -1]  # [B, L-P, H] predicts input_ids[:, P:]
    head = model.get_output_embeddings()
    return token_logprobs(
        hidden, head.weight, input_ids[:, prompt_width:], bias=head.bias, temperature=temperature, entropy=entropy
    )
