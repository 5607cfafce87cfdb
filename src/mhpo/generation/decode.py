"""The decode loop: G completions of each left-padded text prompt, KV-cached, with their log-probs.

    prefill   prompts [U, P] -> cache of the B = U * G rows, logits of the next position [B, V]
              (G > 1: each prompt's positions 0 .. P-2 run once and their keys / values are repeated
              G times (:func:`mhpo.models.logprobs.prompt_prefix_cache`); only the last prompt token
              runs per row)
    step t    y_t, logp_t, H_t = pick_tokens(logits)          one forward of [n, 1] tokens per step
              rows that sampled an EOS are done: pad and log-prob 0 from then on
    compact   when ``compact_fraction`` of the rows still in the batch are done, they leave it (their
              cache rows too), so finished rows stop costing forward passes
    stop      when every row is done, or after ``max_new_tokens`` steps

Position ids are those ``generate`` uses for left-padded rows: cumsum(attention_mask) - 1, then +1
per new token. The cache is transformers' ``DynamicCache`` with :class:`ReservedLayer` layers. The
forward passes are those of ``model.generate`` with the same settings (greedy decoding gives its
tokens, tested); sampling draws from the same distribution with one uniform number per row
(:func:`mhpo.generation.sampling.draw`; tested against ``generate``'s token frequencies), so a seed
gives other tokens than ``generate``.
Under bf16 autocast the weights are cast once per call, not once per step; in float32 on an x86 CPU
the large linear weights are packed for oneDNN once per call (:mod:`mhpo.models.packed`: same values
up to float32 rounding; 1.1-2.4x the products' rate at a decode step's 8-32 rows, measured).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from mhpo.generation.sampling import pick_tokens
from mhpo.models.device import cast_weights_once
from mhpo.models.logprobs import decoder, prompt_prefix_cache
from mhpo.models.packed import packed_linears

# Compact the batch once this fraction of its rows is done: a compaction copies the KV cache once
# (its reserved room included), a done row costs a forward row every step.
COMPACT_FRACTION = 0.25
# Positions reserved at a time in each layer's key / value buffers (:class:`ReservedLayer`): a full
# buffer is copied once into one with this much more room, i.e. once every ROOM steps instead of
# every step, and a row holds at most ROOM unused positions (doubling would hold up to 2x the cache).
ROOM = 128


@dataclass
class Decoded:
    tokens: torch.Tensor  # [B, C] sampled ids, pad after a row's EOS; C = steps run (<= max_new_tokens)
    logprobs: torch.Tensor  # [B, C] float32 log softmax(logits / T)[token], 0 after a row's EOS
    entropy: torch.Tensor | None = None  # [B, C] float32 entropy of softmax(logits / T), 0 after EOS (if asked)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, L] -> [N, L]: cumsum(mask) - 1 on real tokens, 0 on left padding (as generate does)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,  # [U, P] left-padded prompts
    attention_mask: torch.Tensor,  # [U, P]
    *,
    group_size: int = 1,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    compact_fraction: float | None = COMPACT_FRACTION,  # None: never compact
    entropy: bool = False,
) -> Decoded:
    """``group_size`` completions per prompt (rows i*G .. i*G+G-1 for prompt i) of a causal LM."""
    pick = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, entropy=entropy)
    B, P = input_ids.shape[0] * group_size, input_ids.shape[1]
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)  # [B, C]
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=input_ids.device)  # [B, C]
    ent = torch.zeros_like(logprobs) if entropy else None  # [B, C]
    if max_new_tokens == 0 or B == 0:
        return Decoded(tokens, logprobs, ent)
    # bf16 autocast: cast the weights once, not per step; float32 on x86: weights packed for oneDNN
    with cast_weights_once(input_ids.device), packed_linears(model, rows=B):
        cache, logits = prefill(model, input_ids, attention_mask, group_size)  # logits [B, V]
        reserve_room(cache, min(max_new_tokens - 1, ROOM))
        if not compactable(cache):
            compact_fraction = None
        attn = attention_mask.repeat_interleave(group_size, 0)  # [B, P]
        attn = torch.cat([attn, attn.new_ones(B, max_new_tokens)], 1)  # [B, P + C]
        pos = position_ids(attention_mask)[:, -1:].repeat_interleave(group_size, 0) + 1  # [B, 1] first new token
        rows = torch.arange(B, device=input_ids.device)  # [n] output row of each row still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # [n]
        eos = torch.as_tensor(list(eos_ids), device=input_ids.device)
        steps = max_new_tokens
        for t in range(max_new_tokens):
            tok, lp, h = pick_tokens(logits, **pick)  # [n], [n], [n] or None
            tok, lp = tok.masked_fill(done, pad_id), lp.masked_fill(done, 0.0)
            tokens[rows, t], logprobs[rows, t] = tok, lp
            if ent is not None:
                ent[rows, t] = h.masked_fill(done, 0.0)
            done |= torch.isin(tok, eos)
            if t + 1 == max_new_tokens or bool(done.all()):
                steps = t + 1
                break
            if compact_fraction is not None and int(done.sum()) >= max(compact_fraction * len(done), 1):
                keep = (~done).nonzero().squeeze(1)  # [n']
                cache.batch_select_indices(keep)
                rows, attn, pos, tok, done = rows[keep], attn[keep], pos[keep], tok[keep], done[keep]
            out = model(
                input_ids=tok.unsqueeze(1),
                attention_mask=attn[:, : P + t + 1],
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
            pos += 1
    return Decoded(tokens[:, :steps], logprobs[:, :steps], ent[:, :steps] if ent is not None else None)


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values [B, Hkv, L, d] are views of buffers [B, Hkv, L + room, d].

    ``update`` writes the new positions into the room and widens the views; DynamicLayer instead
    concatenates, i.e. copies the layer's whole cache at every step. The views are what attention
    reads, so every forward sees the same keys and values either way (tokens and log-probs equal bit
    for bit, tested). Measured on a 2-core Intel Xeon with AMX-BF16 (SmolLM2-135M, 8 prompts x 4, <= 64
    new tokens, same seeds, 4 alternations each): sampling 5.08 s against 5.56 s under bf16-mixed
    (the concatenations were 13% of the profile there), 8.37 s against 8.71 s in float32. A full
    buffer is copied into one with :data:`ROOM` more positions."""

    @classmethod
    def reserve(cls, layer: DynamicLayer, room: int) -> ReservedLayer:
        """A ReservedLayer holding ``layer``'s keys and values with room for ``room`` more positions."""
        new = cls()
        new.dtype, new.device, new.is_initialized = layer.dtype, layer.device, True
        new._key_room, new._value_room = _with_room(layer.keys, room), _with_room(layer.values, room)
        new._fill(layer.keys.shape[-2])
        return new

    def update(self, key_states, value_states, *args, **kwargs):  # [B, Hkv, n, d] each
        L, n = self.keys.shape[-2], key_states.shape[-2]
        if L + n > self._key_room.shape[-2]:
            self._key_room = _with_room(self.keys, max(n, ROOM))
            self._value_room = _with_room(self.values, max(n, ROOM))
        self._key_room[:, :, L : L + n] = key_states
        self._value_room[:, :, L : L + n] = value_states
        self._fill(L + n)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        L = self.keys.shape[-2]
        self._key_room, self._value_room = self._key_room[indices], self._value_room[indices]
        self._fill(L)

    def _fill(self, length: int) -> None:
        self.keys, self.values = self._key_room[:, :, :length], self._value_room[:, :, :length]


def _with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """[B, H, L, d] -> a new [B, H, L + room, d] buffer whose first L positions are ``x``."""
    out = x.new_empty(*x.shape[:2], x.shape[2] + room, x.shape[3])
    out[:, :, : x.shape[2]] = x
    return out


def reserve_room(cache, room: int) -> None:
    """Swap each plain ``DynamicLayer`` of ``cache`` for a :class:`ReservedLayer` with ``room``
    positions to spare (other layer types, e.g. sliding windows, stay as they are)."""
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and room > 0:
            layers[i] = ReservedLayer.reserve(layer, room)


def compactable(cache) -> bool:
    """Whether every layer of ``cache`` can drop batch rows (DynamicCache's layers can)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(hasattr(layer, "batch_select_indices") for layer in layers)


def prefill(model, input_ids, attention_mask, group_size: int):
    """(KV cache of the B = U * G rows' prompts, logits [B, V] of the position after each prompt).

    With G > 1 and P > 1 the prompts' shared part runs once per prompt (``prompt_prefix_cache``);
    otherwise, or for a cache that cannot be shared, every row runs its whole prompt.
    """
    pos = position_ids(attention_mask)  # [U, P]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(group_size)  # [B]
    if group_size > 1 and input_ids.shape[1] > 1:
        cache = prompt_prefix_cache(decoder(model), input_ids, attention_mask, pos, rows)
        if cache is not None:
            out = model(
                input_ids=input_ids[rows, -1:],
                attention_mask=attention_mask[rows],
                position_ids=pos[rows, -1:],
                past_key_values=cache,
                use_cache=True,
            )
            return out.past_key_values, out.logits[:, -1]
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(
        input_ids=input_ids[rows], attention_mask=attention_mask[rows], position_ids=pos[rows], use_cache=True, **keep
    )
    return out.past_key_values, out.logits[:, -1]
