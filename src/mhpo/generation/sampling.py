"""One decoding step on logits: pick the next token and its log-prob under the tempered policy.

    z          = logits / T                                   [n, V] float32 (no division when T = 1)
    logp(y)    = z[y] - logsumexp(z)                          the full distribution, before any truncation
    sampling:    y ~ softmax(truncate(z))                     torch.multinomial, as ``model.generate`` draws
    greedy:      y = argmax(logits)

``truncate`` keeps the top-k logits (``torch.topk``, no sort) and then the smallest set of the
highest logits whose probability reaches top_p (a sort: of the k kept values when top_k is set, of
the whole vocabulary otherwise); either filter is skipped when off (top_k = 0, top_p = 1). The
kept sets are those of transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` up to ties, so
with the same RNG state the same tokens come out as from ``generate``.

The log-prob is that of the full tempered distribution, whatever truncation sampled: it is what
the trainer recomputes (:func:`mhpo.models.logprobs.model_logprobs` at temperature T).
"""

from __future__ import annotations

import torch


def pick_tokens(
    logits: torch.Tensor,  # [n, V] raw logits of the next position
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n] long, [n] float32)
    """(next tokens, their log-probs log softmax(logits / T)[token]) for one decoding step."""
    logits = logits.float()  # no copy when already float32
    z = logits if temperature == 1.0 else logits / temperature  # [n, V]
    if do_sample:
        probs = torch.softmax(truncate(z, top_k, top_p), dim=-1)  # [n, V]
        tokens = torch.multinomial(probs, num_samples=1).squeeze(1)  # [n]
    else:
        tokens = logits.argmax(-1)  # [n]; on the raw logits: dividing by T can create ties
    return tokens, token_logprobs(z, tokens)


def token_logprobs(z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[n, V], [n] -> [n]: z[token] - logsumexp(z), the log-prob of each token under softmax(z)."""
    return z.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)


def truncate(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[n, V] -> [n, V]: z with -inf outside the top-k and then outside the top-p nucleus (``z`` itself
    when neither filter is on)."""
    vocab = z.shape[-1]
    top = None  # [n, k] the k largest logits, descending
    if 0 < top_k < vocab:
        top = torch.topk(z, top_k, dim=-1).values
        z = z.masked_fill(z < top[:, -1:], float("-inf"))
    if top_p < 1.0:
        if top is None:
            top = torch.sort(z, dim=-1, descending=True).values  # [n, V]
        z = z.masked_fill(z < nucleus_floor(top, top_p), float("-inf"))
    return z


def nucleus_floor(top: torch.Tensor, top_p: float) -> torch.Tensor:
    """[n, k] logits sorted descending -> [n, 1]: the smallest logit of the top-p nucleus.

    In ascending order a_1 <= ... <= a_k with c_i = sum_{j <= i} softmax(a)_j, the entries with
    c_i <= 1 - top_p are dropped (the largest is always kept): transformers' TopPLogitsWarper.
    """
    ascending = top.flip(-1)  # [n, k]
    dropped = ascending.softmax(-1).cumsum(-1) <= 1.0 - top_p  # [n, k], a prefix of each row
    dropped[:, -1] = False
    return ascending.gather(1, dropped.sum(-1, keepdim=True))  # [n, 1]
