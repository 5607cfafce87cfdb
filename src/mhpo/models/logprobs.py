"""Per-token log-probabilities (and entropy) of sampled tokens under a causal LM.

    z_t    = (h_t W^T + b) / temperature                     logits, [V] per token
    logp_t = z_t[y_t] - logsumexp(z_t)                       log-prob of the sampled token y_t
    H_t    = -sum_v p_tv log p_tv = logsumexp(z_t) - sum_v p_tv z_tv,   p_t = softmax(z_t)

`token_logprobs` works from final hidden states and the output-embedding matrix without ever
holding the [tokens, V] logits: it walks over chunks of tokens, and its backward recomputes each
chunk's logits (see `_ChunkedLogprobs`). `token_logprobs_reference` is the plain autograd version
that materialises every logit; it is kept for tests and benchmarks. `model_logprobs` runs a
Hugging Face causal LM's base model and scores the completion part of each row.

Everything is computed in float32 (float64 when an input is float64), with autocast switched off:
half-precision hidden states or weights are upcast per chunk, and gradients come back in each
input's own dtype.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from mhpo.models.lora import unwrap

# Logits held per chunk by default: 2048 tokens at V = 50k (~410 MB of float32 logits), i.e. fewer
# tokens for larger vocabularies. Tuned on a 2-core CPU with benchmarks/logprobs.py (V = 50k, 8k
# tokens, H = 896): chunks of 512 .. 4096 tokens all ran in 0.77-0.80x the naive wall time (CPU
# time fell from 0.90x to 0.79x as chunks grew: fewer parallel regions, which matters on a shared
# machine), while extra memory grew from 0.04x to 0.13x of naive; 2048 is the middle ground.
DEFAULT_CHUNK_ELEMENTS = 2048 * 50_000

# Config keys whose presence means the causal LM post-processes lm_head's output, so logits
# computed from hidden states would be wrong. Caps change logits whenever set; scales unless 1.
_LOGIT_CAPS = ("final_logit_softcapping", "logits_soft_cap")
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier")


def token_logprobs(
    hidden: torch.Tensor,  # [..., H] final hidden states at the positions that predict `targets`
    weight: torch.Tensor,  # [V, H] output embedding (lm_head) matrix
    targets: torch.Tensor,  # [...] token ids
    *,
    bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: int | None = None,  # tokens per chunk; None -> default_chunk_size(V)
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([...] float32, [...] float32 | None)
    """Log-probs (and entropy) of ``targets``, chunked over tokens; never holds [tokens, V] logits.

    Peak extra memory is one [chunk_size, V] float32 buffer (two with entropy) plus the [V, H]
    weight gradient. Gradients flow to ``hidden``, ``weight`` and ``bias`` through both outputs (an
    entropy bonus gets its true gradient). Double backward is not supported.
    Raises ValueError on mismatched shapes, a non-positive temperature or chunk size, or a target
    id outside [0, V).
    """
    _check_inputs(hidden, weight, targets, bias, temperature)
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    lead = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_targets = targets.reshape(-1).long()  # [N]
    logp, ent = _ChunkedLogprobs.apply(flat_hidden, weight, bias, flat_targets, 1.0 / temperature, entropy, chunk)
    return logp.view(lead), (ent.view(lead) if entropy else None)


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk when none is given: DEFAULT_CHUNK_ELEMENTS // V (2048 at V = 50k), >= 1."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab)


def token_logprobs_reference(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [...]
    *,
    bias: torch.Tensor | None = None,  # [V]
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([...] float32, [...] float32 | None)
    """Reference path: materialises the [..., V] logits (in float32, autocast off) and lets autograd
    differentiate. Same values as `token_logprobs`, at O(tokens x V) memory."""
    _check_inputs(hidden, weight, targets, bias, temperature)
    dtype = _compute_dtype(hidden, weight)
    b = None if bias is None else bias.to(dtype)
    with _no_autocast(hidden):
        logits = F.linear(hidden.to(dtype), weight.to(dtype), b)  # [..., V]
    return logits_logprobs(logits, targets, temperature=temperature, entropy=entropy)


def logits_logprobs(
    logits: torch.Tensor,  # [..., V] raw logits (before temperature)
    targets: torch.Tensor,  # [...]
    *,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([...] float32, [...] float32 | None)
    """Log-probs (and entropy) from materialised logits; half-precision logits are upcast."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature  # [..., V]
    logz = torch.logsumexp(z, dim=-1)  # [...]
    logp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - logz
    ent = None
    if entropy:
        ent = logz - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, ent


def model_logprobs(
    model,
    input_ids: torch.Tensor,  # [B, L] prompt (left-padded to width P) + completion
    attention_mask: torch.Tensor,  # [B, L]
    prompt_width: int,  # P: completion tokens are input_ids[:, P:]
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: int | None = None,  # tokens per chunk for `token_logprobs`
    share_prompts: bool = False,  # run each distinct prompt once (see `_shared_prompt_hidden`)
    prompt_cache=None,  # the rows' prompt keys / values at positions 0 .. P-2 (`PromptPrefix.cache`)
    **model_inputs,  # extra inputs for the base model (e.g. pixel_values for a VLM)
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([B, L-P], [B, L-P] | None)
    """Log-probs of the completion tokens, from the base model's hidden states (no full logits).

    With ``share_prompts``, rows with identical prompts (a GRPO group) run the prompt once and
    share its keys and values (:func:`_shared_prompt_hidden`): same values and gradients up to
    float rounding, about half the work when prompts are as long as completions. With
    ``prompt_cache`` (a :class:`PromptPrefix`'s, built by the caller for several calls) no prompt
    runs here: only positions P-1 onward, on top of those keys and values.

    Tied or untied heads and heads with a bias are scored from hidden states with
    `token_logprobs`. Models that post-process lm_head's output (Gemma-2 style
    ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1
    ``lm_head_multiplier``, a ``final_logits_bias``) or have no linear output embedding fall back
    to the reference path: the full model's logits for the completion positions, materialised.
    """
    length = input_ids.shape[-1]
    if not 1 <= prompt_width <= length:
        raise ValueError(f"prompt_width must be in [1, {length}] (sequence length), got {prompt_width}")
    targets = input_ids[:, prompt_width:]  # [B, L-P]
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or logits_postprocessed(model):
        logits = _completion_logits(model, input_ids, attention_mask, prompt_width, model_inputs)  # [B, L-P, V]
        return logits_logprobs(logits, targets, temperature=temperature, entropy=entropy)
    base = decoder(model)
    hidden = None
    if prompt_cache is not None:
        hidden = _hidden_after_prompts(base, input_ids, attention_mask, prompt_width, prompt_cache, model_inputs)
    elif share_prompts:
        hidden = _shared_prompt_hidden(base, input_ids, attention_mask, prompt_width, model_inputs)
    if hidden is None:
        out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
        hidden = out.last_hidden_state[:, prompt_width - 1 : -1]  # [B, L-P, H] predicts input_ids[:, P:]
    return token_logprobs(
        hidden,
        head.weight,
        targets,
        bias=getattr(head, "bias", None),
        temperature=temperature,
        entropy=entropy,
        chunk_size=chunk_size,
    )


def decoder(model):
    """The transformer body under a causal LM's head (``model.model`` for Qwen2 / Llama), through a peft
    wrapper too (whose own ``.model`` is the whole causal LM): it returns ``last_hidden_state``."""
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix)


def prompt_prefix_cache(base, input_ids, attention_mask, position_ids, rows: torch.Tensor):
    """KV cache of prompts' positions 0 .. P-2, computed once per prompt and gathered to ``rows``.

    input_ids / attention_mask / position_ids [U, P]: U distinct left-padded prompts; rows [B]: the
    prompt of each of B sequences. The base model runs once over [U, P-1]; each layer's keys and
    values [U, heads, P-1, d] are gathered to [B, heads, P-1, d] (``index_select``: with gradients
    on, they sum over the rows that share a prompt). The caller then runs positions P-1 onward on
    top: attention sees exactly the keys and values of one full pass, so results equal it up to float
    rounding. None when the cache is not one plain key/value pair per layer (e.g. sliding windows).
    """
    cache = _prefix_pass(base, input_ids, attention_mask, position_ids)
    return _gather_rows(cache, rows) if cache is not None else None


def _gather_rows(cache, rows: torch.Tensor):
    """``cache`` with each layer's keys and values [U, heads, P-1, d] gathered to ``rows`` [B] (in place)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    return cache


def _prefix_pass(base, input_ids, attention_mask, position_ids):
    """The base model over prompts' positions 0 .. P-2 ([U, P] inputs): its KV cache, or None when
    that is not one plain key/value pair per layer."""
    head = {"position_ids": position_ids[:, :-1]} if position_ids is not None else {}
    cache = base(
        input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=True, **head
    ).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return cache


def _distinct_prompts(base, input_ids, attention_mask, prompt_width: int, model_inputs):
    """(the distinct prompts' positions 0 .. P-2 run once: their KV cache [U, heads, P-1, d] per layer,
    row -> distinct prompt [B]) for B rows ([B, L] inputs, prompts left-padded to width P); rows
    share a prompt when its tokens and padding are equal. None where that does not apply: extra model
    inputs besides position ids (e.g. pixels), a one-token prompt, no repeated prompt, checkpointed
    layers in training (they drop the KV cache: transformers' GradientCheckpointingLayer), or a cache
    it cannot share."""
    P = prompt_width
    pos = model_inputs.get("position_ids")
    if getattr(base, "gradient_checkpointing", False) and base.training:
        return None
    if P < 2 or set(model_inputs) - {"position_ids"} or (pos is not None and not isinstance(pos, torch.Tensor)):
        return None
    key = torch.cat([input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype)], dim=1)  # [B, 2P]
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)  # inv [B]: row -> distinct prompt
    if len(uniq) == len(key):
        return None
    rows = torch.arange(len(key), device=key.device)
    first = torch.full((len(uniq),), len(key), dtype=torch.long, device=key.device).scatter_reduce(0, inv, rows, "amin")
    cache = _prefix_pass(
        base, input_ids[first, :P], attention_mask[first, :P], pos[first, :P] if pos is not None else None
    )
    return (cache, inv) if cache is not None else None


def _shared_prompt_hidden(base, input_ids, attention_mask, prompt_width, model_inputs):
    """Final hidden states [B, L-P, H] at positions P-1 .. L-2, computing each distinct prompt once
    (:func:`_distinct_prompts`) and gathering its keys and values to the rows that share it. None
    where prompts cannot be shared."""
    found = _distinct_prompts(base, input_ids, attention_mask, prompt_width, model_inputs)
    if found is None:
        return None
    cache = _gather_rows(*found)
    return _hidden_after_prompts(base, input_ids, attention_mask, prompt_width, cache, model_inputs)


class PromptPrefix:
    """The prompts of a set of rows (a minibatch), run once for several forward passes over those rows
    (its micro-batches): each distinct prompt's keys and values at positions 0 .. P-2.

    Each pass reads its rows' prompts through :meth:`cache` and leaves their gradient on this
    object's detached copies (``index_select``'s backward sums over the rows that share a prompt);
    :meth:`backward`, after the last pass, sends that sum through the prompt pass once. Parameter
    gradients are those of running every row's prompt in every pass, up to float rounding: the
    chain rule through keys and values is linear, so summing before or after the prompt pass is the
    same. The prompt pass's activations stay alive until :meth:`backward`.
    """

    def __init__(self, cache, prompt_of: torch.Tensor):  # cache: DynamicCache of [U, heads, P-1, d]
        self._graph = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # 2 per layer
        self._leaves = [t.detach().requires_grad_(t.requires_grad) for t in self._graph]
        self.prompt_of = prompt_of  # [m] row -> distinct prompt 0 .. U-1

    def cache(self, rows: torch.Tensor):
        """A fresh DynamicCache of ``rows``' prompts (rows [b]: positions among the m rows)."""
        from transformers import DynamicCache

        idx = self.prompt_of[rows]  # [b]
        gathered = [t.index_select(0, idx) for t in self._leaves]  # [b, heads, P-1, d] each
        return DynamicCache(ddp_cache_data=list(zip(gathered[0::2], gathered[1::2])))

    def backward(self) -> None:
        """Back-propagate the gradients the passes left on the prompts' keys and values; once."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self._graph, self._leaves) if leaf.grad is not None]
        self._graph, self._leaves = [], []
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def prompt_prefix(model, input_ids, attention_mask, prompt_width: int, **model_inputs) -> PromptPrefix | None:
    """:class:`PromptPrefix` of m rows ([m, L] inputs, prompts left-padded to width P, the same
    ``model_inputs`` as the passes that will read it); None where prompts cannot be shared
    (:func:`_distinct_prompts`)."""
    found = _distinct_prompts(decoder(model), input_ids, attention_mask, prompt_width, model_inputs)
    return PromptPrefix(*found) if found is not None else None


def _hidden_after_prompts(base, input_ids, attention_mask, prompt_width, cache, model_inputs):
    """Final hidden states [B, L-P, H] at positions P-1 .. L-2, running positions P-1 .. L-1 on top of
    ``cache`` (the rows' keys and values at positions 0 .. P-2)."""
    P = prompt_width
    pos = model_inputs.get("position_ids")
    tail = {"position_ids": pos[:, P - 1 :]} if pos is not None else {}
    out = base(
        input_ids=input_ids[:, P - 1 :], attention_mask=attention_mask, past_key_values=cache, use_cache=True, **tail
    )
    return out.last_hidden_state[:, :-1]


def logits_postprocessed(model) -> bool:
    """True when ``model``'s logits are not just ``lm_head(hidden)`` (softcap, scale, extra bias)."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for cfg in configs:
        if any(getattr(cfg, key, None) is not None for key in _LOGIT_CAPS):
            return True
        if any(getattr(cfg, key, None) not in (None, 1, 1.0) for key in _LOGIT_SCALES):
            return True
    return hasattr(model, "final_logits_bias")


def _completion_logits(model, input_ids, attention_mask, prompt_width, model_inputs) -> torch.Tensor:
    """The full model's logits at positions P-1 .. L-2 (those predicting the completion): [B, L-P, V]."""
    kwargs = dict(model_inputs)
    keep = input_ids.shape[-1] - prompt_width + 1  # positions P-1 .. L-1
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    return logits[:, -keep:-1]  # keep = 1 (empty completion) gives [B, 0, V]


class _ChunkedLogprobs(torch.autograd.Function):
    """logp (and H) of N tokens, chunked over tokens; backward recomputes each chunk's logits.

    Saved for backward: hidden [N, H], weight [V, H], bias [V], targets [N], logsumexp [N] and
    H [N] -- never a logit. With z = (h W^T + b) / T, p = softmax(z), log p = z - logsumexp(z):

        d logp / d z = onehot(y) - p
        d H / d z    = -p (log p + H)          (H = -sum p log p; d p_v / d z_u = p_v (1[u=v] - p_u))

    so the gradient of the upstream loss w.r.t. a chunk's logits is

        g_z = g_logp (onehot(y) - p) - g_H p (log p + H) = onehot(y) g_logp - p (g_logp + g_H (log p + H))

    and, through z = (h W^T + b) / T:  dh = g_z W / T,  dW = g_z^T h / T,  db = sum_tokens g_z / T.
    The 1/T is folded into h before the matmul, so the chunk's logits never need a rescale pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, want_entropy, chunk):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N]
        with _no_autocast(hidden):
            return _ChunkedLogprobs._forward(ctx, hidden, weight, bias, targets, inv_temp, want_entropy, chunk)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, inv_temp, want_entropy, chunk):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)  # [V, H]; no copy when already in the compute dtype
        b = None if bias is None else bias.to(dtype) * inv_temp  # [V]
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=dtype)  # [N]
        logz = hidden.new_empty(n, dtype=dtype)  # [N]
        ent = hidden.new_empty(n if want_entropy else 0, dtype=dtype)  # [N] or [0]
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = _chunk_logits(_scaled_hidden(hidden[rows], inv_temp, dtype), w, b)  # [c, V]
            target_logit = z.gather(1, targets[rows].unsqueeze(1)).squeeze(1)  # [c]
            logz[rows], ent_rows = _logsumexp_entropy_(z, want_entropy)
            logp[rows] = target_logit - logz[rows]
            if want_entropy:
                ent[rows] = ent_rows
            del z  # free this chunk's logits before the next chunk allocates its own
        ctx.save_for_backward(hidden, weight, bias, targets, logz, ent)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        ctx.mark_non_differentiable(*(() if want_entropy else (ent,)))
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):  # [N] | None each
        with _no_autocast(g_logp if g_logp is not None else g_ent):
            return _ChunkedLogprobs._backward(ctx, g_logp, g_ent)

    @staticmethod
    def _backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, logz, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        dtype, inv_temp = logz.dtype, ctx.inv_temp
        n = hidden.shape[0]
        w = weight.to(dtype)  # [V, H]
        b = None if bias is None else bias.to(dtype) * inv_temp  # [V]
        g_logp = torch.zeros_like(logz) if g_logp is None else g_logp.to(dtype)  # [N]
        d_hidden = torch.empty_like(hidden) if need_h else None  # [N, H]
        d_weight = torch.zeros_like(w) if need_w else None  # [V, H] float accumulator
        d_bias = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_b else None  # [V]
        for start in range(0, n, ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = _scaled_hidden(hidden[rows], inv_temp, dtype)  # [c, H] = h / T
            g_z = _chunk_logits(h, w, b)  # [c, V]: the logits z, recomputed
            g_e = None if g_ent is None else g_ent[rows].to(dtype)
            _logit_grad_(g_z, targets[rows], logz[rows], g_logp[rows], ent[rows] if g_e is not None else None, g_e)
            if need_h:
                d_hidden[rows] = (g_z @ w).mul_(inv_temp)  # [c, H]
            if need_w:
                d_weight.addmm_(g_z.T, h)  # [V, H]; h already carries the 1/T
            if need_b:
                d_bias.add_(g_z.sum(0), alpha=inv_temp)  # [V]
            del g_z  # free this chunk's [c, V] buffer before the next chunk allocates its own
        d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


def _chunk_logits(h, w, b) -> torch.Tensor:
    """z = (h / T) W^T + b / T for one chunk: [c, H] x [V, H] -> [c, V] (h and b come pre-scaled)."""
    return torch.addmm(b, h, w.T) if b is not None else h @ w.T


def _scaled_hidden(hidden, inv_temp, dtype) -> torch.Tensor:
    """h / T in ``dtype`` ([c, H]); no copy when already there and T = 1."""
    h = hidden.to(dtype)
    return h if inv_temp == 1.0 else h * inv_temp


def _logsumexp_entropy_(z, want_entropy) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logsumexp(z) [c] and, if asked, H [c]; overwrites z ([c, V]).

    With m = max z, e = exp(z - m), s = sum e:  logsumexp = m + log s,  H = log s - sum(e (z - m)) / s.
    """
    m = z.amax(1, keepdim=True)  # [c, 1]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: keep exp() finite
    z.sub_(m)  # z - m
    if not want_entropy:
        s = z.exp_().sum(1)  # [c]
        return m.squeeze(1) + s.log(), None
    e = torch.exp(z)  # [c, V]
    s = e.sum(1)  # [c]
    ez = e.mul_(z).sum(1)  # [c] sum e (z - m)
    log_s = s.log()
    return m.squeeze(1) + log_s, log_s - ez / s


def _logit_grad_(z, targets, logz, g_logp, ent, g_ent) -> None:
    """Turn a chunk's logits z [c, V] in place into g_z = onehot(y) g_logp - p (g_logp + g_H (log p + H))."""
    z.sub_(logz.unsqueeze(1))  # log p
    if g_ent is None:
        z.exp_().mul_(-g_logp.unsqueeze(1))  # -p g_logp
    else:
        p = torch.exp(z)  # [c, V]
        z.add_(ent.unsqueeze(1)).mul_(-g_ent.unsqueeze(1)).sub_(g_logp.unsqueeze(1))  # -(g_logp + g_H (log p + H))
        z.mul_(p)
        del p
    z.scatter_add_(1, targets.unsqueeze(1), g_logp.unsqueeze(1))  # + onehot(y) g_logp


def _no_autocast(tensor: torch.Tensor | None):
    """Autocast off on ``tensor``'s device, so matmuls stay in the compute dtype."""
    device = tensor.device.type if tensor is not None else "cpu"
    return torch.autocast(device_type=device, enabled=False)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """float64 when either input is float64, else float32."""
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def _check_inputs(hidden, weight, targets, bias, temperature) -> None:
    """Raise ValueError naming the first bad shape, dtype, value or id."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if vocab == 0 or width == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != width:
        shapes = f"weight {tuple(weight.shape)}, got {tuple(hidden.shape)}"
        raise ValueError(f"hidden must be [..., {width}] to match {shapes}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        shapes = f"{tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        raise ValueError(f"targets shape {shapes}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must be [{vocab}], got shape {tuple(bias.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"target ids must be in [0, {vocab}), got min {lo} and max {hi}")
