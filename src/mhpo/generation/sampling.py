"""One decoding step on logits: pick the next token, its log-prob and the entropy under the tempered policy.

    z          = logits / T                                   [n, V] float32 (no division when T = 1)
    logp(y)    = z[y] - logsumexp(z)                          the full distribution, before any truncation
    H          = logsumexp(z) - sum_v softmax(z)_v z_v        (when asked)
    sampling:    y ~ softmax(truncate(z))                     inverse CDF: :func:`draw`
    greedy:      y = argmax(logits)

``truncate`` keeps the top-k logits (``torch.topk``, no sort) and then the smallest set of the
highest logits whose probability reaches top_p (from the 256 largest logits when they hold it, as
they do for a peaked distribution; else a sort: of the k kept values when top_k is set, of the
whole vocabulary otherwise); either filter is skipped when off (top_k = 0, top_p = 1). The kept
sets are those of transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` up to ties and rounding.

Sampling draws one uniform number per row (``model.generate``'s ``torch.multinomial`` draws an
exponential variate per vocabulary entry: a sixth of a SmolLM2 decode step on a 2-core CPU). The
distribution is the same; the random stream is not, so a seed gives other tokens than ``generate``.

The log-prob is that of the full tempered distribution, whatever truncation sampled: it is what
the trainer recomputes (:func:`mhpo.models.logprobs.model_logprobs` at temperature T), and so is
the entropy.
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
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # ([n] long, [n] float32, [n] float32 or None)
    """(next tokens, their log-probs log softmax(logits / T)[token], the entropy of softmax(logits / T)
    when ``entropy``) for one decoding step."""
    logits = logits.float()  # no copy when already float32
    z = logits if temperature == 1.0 else logits / temperature  # [n, V]
    if do_sample:
        tokens = draw(truncate(z, top_k, top_p))  # [n]
    else:
        tokens = logits.argmax(-1)  # [n]; on the raw logits: dividing by T can create ties
    lse = torch.logsumexp(z, dim=-1)  # [n], shared by the log-prob and the entropy
    logp = token_logprobs(z, tokens, lse)  # [n]
    ent = lse - (torch.softmax(z, dim=-1) * z).nan_to_num_(0.0).sum(-1) if entropy else None  # [n]
    return tokens, logp, ent


def draw(z: torch.Tensor) -> torch.Tensor:
    """[n, V] logits (-inf where excluded) -> [n] long: one token per row from softmax(z), by inverse CDF.

        w = exp(z - max z),  c = cumsum(w) (float64),  y = min{ i : c_i >= (1 - u) c_V },  u ~ U[0, 1)

    (1 - u) is in (0, 1], so the chosen entry has w_y > 0: an excluded token is never drawn. The sums
    run in float64 so that rare tokens keep their probability (a float32 running sum near 1 cannot
    resolve increments below 6e-8).
    """
    w = (z - z.max(dim=-1, keepdim=True).values).exp_()  # [n, V], 0 where z = -inf
    cdf = w.cumsum(dim=-1, dtype=torch.float64)  # [n, V]
    u = torch.rand(z.shape[0], 1, dtype=torch.float64, device=z.device)  # [n, 1]
    tokens = torch.searchsorted(cdf, (1.0 - u) * cdf[:, -1:])  # [n, 1]
    return tokens.squeeze(1).clamp_(max=z.shape[-1] - 1)


def token_logprobs(z: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """[n, V], [n] -> [n]: z[token] - logsumexp(z), the log-prob of each token under softmax(z)
    (``lse`` [n]: logsumexp(z) when the caller has it already)."""
    lse = torch.logsumexp(z, dim=-1) if lse is None else lse
    return z.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse


def truncate(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[n, V] -> [n, V]: z with -inf outside the top-k and then outside the top-p nucleus (``z`` itself
    when neither filter is on)."""
    vocab = z.shape[-1]
    top = None  # [n, k] the k largest logits, descending
    if 0 < top_k < vocab:
        top = torch.topk(z, top_k, dim=-1).values
        z = z.masked_fill(z < top[:, -1:], float("-inf"))
    if top_p < 1.0:
        floor = nucleus_floor_from_head(z, top_p) if top is None else None  # [n, 1]: no sort when it can
        if floor is None:
            if top is None:
                top = torch.sort(z, dim=-1, descending=True).values  # [n, V]
            floor = nucleus_floor(top, top_p)
        z = z.masked_fill(z < floor, float("-inf"))
    return z


# The largest logits examined before sorting the whole vocabulary for a top-p nucleus.
NUCLEUS_HEAD = 256


def nucleus_floor_from_head(z: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """[n, V] -> [n, 1]: the top-p nucleus's smallest logit from the ``NUCLEUS_HEAD`` largest logits
    alone (``torch.topk``), or None when some row's nucleus may reach beyond them.

    With q_1 >= q_2 >= ... the probabilities in descending order, token j is kept iff the mass ranked
    above it is below top_p: sum_{i<j} q_i < top_p (:func:`nucleus_floor`'s rule, read from the other
    end). When the head's mass reaches top_p, every token after it is dropped, so the head decides.
    """
    vocab = z.shape[-1]
    if vocab <= NUCLEUS_HEAD:
        return None
    head = torch.topk(z, NUCLEUS_HEAD, dim=-1).values  # [n, h] descending
    q = torch.exp(head - torch.logsumexp(z, dim=-1, keepdim=True))  # [n, h] probabilities
    above = q.cumsum(-1) - q  # [n, h] mass ranked above each
    if not bool((above[:, -1] + q[:, -1] >= top_p).all()):
        return None
    kept = (above < top_p).sum(-1, keepdim=True)  # [n, 1] >= 1 (nothing lies above the first)
    return head.gather(1, kept - 1)


def nucleus_floor(top: torch.Tensor, top_p: float) -> torch.Tensor:
    """[n, k] logits sorted descending -> [n, 1]: the smallest logit of the top-p nucleus.

    In ascending order a_1 <= ... <= a_k with c_i = sum_{j <= i} softmax(a)_j, the entries with
    c_i <= 1 - top_p are dropped (the largest is always kept): transformers' TopPLogitsWarper.
    """
    ascending = top.flip(-1)  # [n, k]
    dropped = ascending.softmax(-1).cumsum(-1) <= 1.0 - top_p  # [n, k], a prefix of each row
    dropped[:, -1] = False
    return ascending.gather(1, dropped.sum(-1, keepdim=True))  # [n, 1]
