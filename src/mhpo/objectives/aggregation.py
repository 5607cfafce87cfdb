"""Token weights for the loss aggregation modes (names as in verl).

Every mode is a weighted sum J = sum_{i,t} w_it j_it with weights that are uniform inside a
sequence, so the gradient of a token is w_it * A * M(r_it). With global counts over the whole
optimizer step, the gradients of k micro-batches sum exactly to the full-batch gradient.

    token-mean               w_it = m_it / N_tok
    seq-mean-token-mean      w_it = m_it / (|o_i| * N_seq)              (GRPO paper)
    seq-mean-token-sum-norm  w_it = m_it / (L * N_seq)                  (Dr. GRPO; L a constant)

N_tok = masked tokens, N_seq = sequences with at least one masked token (both global if given,
else counted in this batch), L = ``norm_length`` (default: the padded width T).
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_agg(mode: str) -> str:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation {mode!r}; valid aggregations: {', '.join(AGG_MODES)}")
    return mode


def _count(value, name: str):
    if value is None:
        return None
    v = float(value)
    if not v > 0:
        raise ValueError(f"{name}={value!r} must be a positive count (the global count over the step)")
    return v


def row_weights(
    mask: torch.Tensor,  # [B, T] float 0/1
    mode: str,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_length: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [B, 1]
    """Per-row scale s_i with w_it = m_it * s_i: every mode weights a sequence's tokens uniformly.

    token-mean: 1 / N_tok;  seq-mean-token-mean: 1 / (|o_i| N_seq);  seq-mean-token-sum-norm: 1 / (L N_seq).
    ``mask`` may be bool; the weights are in ``dtype`` (default: the mask's float dtype, else torch's default).
    """
    check_agg(mode)
    dtype = dtype or (mask.dtype if mask.is_floating_point() else torch.get_default_dtype())
    ones = torch.ones(mask.shape[0], 1, dtype=dtype, device=mask.device)
    if mode == "token-mean":
        n = _count(num_tokens, "num_tokens")
        n = n if n is not None else mask.sum(dtype=dtype).clamp(min=1)
        return ones / n
    lengths = mask.sum(dim=-1, keepdim=True, dtype=dtype)  # [B, 1]
    n_seq = _count(num_seqs, "num_seqs")
    if n_seq is None:
        n_seq = (lengths > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return 1.0 / (lengths.clamp(min=1) * n_seq)
    length = _count(norm_length, "norm_length") or mask.shape[-1]
    return ones / (length * n_seq)


def token_weights(mask: torch.Tensor, mode: str, **counts) -> torch.Tensor:  # [B, T]
    """Weights w such that the aggregated objective is sum(w * j); see the module docstring."""
    return mask * row_weights(mask, mode, **counts)


def global_counts(mask: torch.Tensor) -> dict[str, int]:
    """The counts to pass as num_tokens / num_seqs when ``mask`` is the whole step's batch."""
    return {"num_tokens": int(mask.sum()), "num_seqs": int((mask.sum(-1) > 0).sum())}
