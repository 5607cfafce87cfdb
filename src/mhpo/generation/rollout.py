"""Sampling completions: prompts in, a padded batch of sequences and completion masks out.

Layout of a :class:`Rollout` (N rows = prompts x group size, groups contiguous):

    input_ids       [N, P + C]   prompt left-padded to width P, then completion right-padded to C
    attention_mask  [N, P + C]   1 on real prompt tokens and on completion tokens up to the first EOS
    completion_mask [N, C]       tokens up to and including the first EOS (all C when none)
    logprobs        [N, C]       float32 log softmax(logits / T)[token] of each sampled token under the
                                 full tempered distribution (before top-k / top-p), 0 off completion_mask
    entropy         [N, C]       float32 entropy of that distribution at each step (``sample(entropy=True)``)

Sampling is :func:`mhpo.generation.decode` (text prompts: KV cache, one forward per new token for
the whole batch, each prompt prefilled once per group, finished rows dropped) with nothing but
temperature, top-k and top-p (off by default: ``top_k=0, top_p=1``), so the sampled tokens follow
exactly the policy whose log-probs are trained, and ``Rollout.logprobs`` are those log-probs as the
sampler saw them. Prompts with extra model inputs use ``model.generate`` with the same settings
(:func:`mhpo.generation.generate_with_logprobs`), which records the same log-probs.

Extra model inputs (e.g. ``pixel_values`` of a vision-language model) travel in
``Rollout.model_inputs`` into generate and every forward pass; the prompt encoder produces them
(:class:`mhpo.generation.prompts.PromptEncoder` for text, :class:`mhpo.models.multimodal.VisionPromptEncoder`
for images). They are batch-major tensors or the per-sequence / derived values of
:mod:`mhpo.models.multimodal`, and are always sliced, repeated and turned into keyword arguments by
its ``select_inputs`` / ``repeat_inputs`` / ``model_kwargs``, so text-only and image batches take the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mhpo.generation import decode, generate_with_logprobs, position_ids
from mhpo.models.multimodal import cut_at_placeholders, model_kwargs, placeholder_ids, repeat_inputs, select_inputs


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    completion_mask: torch.Tensor  # [N, C] bool
    prompt_width: int  # P
    model_inputs: dict[str, Any] = field(default_factory=dict)  # extra forward inputs (see mhpo.models.multimodal)
    completions: list[str] = field(default_factory=list)
    logprobs: torch.Tensor | None = None  # [N, C] float32 sampler log-probs of sampled tokens, 0 off completion_mask
    entropy: torch.Tensor | None = None  # [N, C] float32 entropy of the sampler's softmax(logits / T), when asked

    @property
    def completion_ids(self) -> torch.Tensor:  # [N, C]
        return self.input_ids[:, self.prompt_width :]

    @property
    def lengths(self) -> torch.Tensor:  # [N] completion tokens (EOS included)
        return self.completion_mask.sum(-1)

    def ended(self, eos_ids: Sequence[int]) -> torch.Tensor:  # [N] bool
        """Which completions contain an end token (the others ran into max_new_tokens)."""
        ids = self.completion_ids
        return (torch.isin(ids, torch.as_tensor(list(eos_ids), device=ids.device)) & self.completion_mask).any(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int], trim: bool = True, trim_prompt: bool = True) -> Rollout:
        """Rows ``rows`` (index tensor or list); ``trim`` drops all-padding columns at both ends
        (only at the completion end with ``trim_prompt=False``: the prompt columns stay as they are,
        e.g. for a prompt cache built over more rows).

        Dropping leading columns that are padding in every row leaves position ids unchanged
        (they are cumsum(attention_mask) - 1).
        """
        idx = torch.as_tensor(rows, dtype=torch.long)
        ids, attn, cmask = self.input_ids[idx], self.attention_mask[idx], self.completion_mask[idx]
        logprobs = self.logprobs[idx] if self.logprobs is not None else None
        entropy = self.entropy[idx] if self.entropy is not None else None
        extra = select_inputs(self.model_inputs, idx, self.input_ids.shape[0])
        comps = [self.completions[i] for i in idx.tolist()] if self.completions else []
        P = self.prompt_width
        if trim and len(idx):
            left = int(attn[:, :P].any(0).long().argmax()) if attn[:, :P].any() else P - 1
            left = min(left, P - 1) if trim_prompt else 0  # keep at least one prompt column
            width = max(int(cmask.sum(-1).max()), 1)
            ids, attn = ids[:, left : P + width], attn[:, left : P + width]
            cmask = cmask[:, :width]
            logprobs = logprobs[:, :width] if logprobs is not None else None
            entropy = entropy[:, :width] if entropy is not None else None
            P = P - left
        return Rollout(ids, attn, cmask, P, extra, comps, logprobs, entropy)


def completion_mask(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """[N, C] -> [N, C] bool: True up to and including the first EOS of each row.

    mask_t = (number of EOS strictly before t) == 0
    """
    is_eos = torch.isin(tokens, torch.as_tensor(list(eos_ids), device=tokens.device))
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return before == 0


def forward_inputs(rollout: Rollout) -> dict[str, Any]:
    """Extra keyword inputs for a forward pass over ``rollout``: its model inputs, and the same
    position ids that generate used for left-padded rows (unless the model inputs bring their own)."""
    extra = dict(rollout.model_inputs)
    extra.setdefault("position_ids", position_ids(rollout.attention_mask))
    return extra


def repeat_rows(inputs: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Repeat every per-sequence input ``repeats`` times per row (prompt i -> rows i*G .. i*G+G-1)."""
    return repeat_inputs(inputs, repeats, inputs["input_ids"].shape[0])


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: dict[str, Any],  # from PromptEncoder: input_ids [B, P], attention_mask [B, P], extras
    *,
    group_size: int = 1,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int | None = None,
    entropy: bool = False,
) -> Rollout:
    """``group_size`` completions per prompt, as a padded Rollout with the sampler's log-probs (and, with
    ``entropy``, the entropy of each step's tempered distribution; text prompts only).

    Text prompts go through :func:`mhpo.generation.decode` in chunks of whole groups (``batch_size``
    rounded down to a multiple of G, at least one group): each prompt is prefilled once and its cache
    repeated for its G completions. Prompts with extra model inputs (images) go through
    ``model.generate`` (:func:`mhpo.generation.generate_with_logprobs`) in chunks of ``batch_size`` rows.

    A completion that samples an image / video placeholder token ends right before it
    (:func:`mhpo.models.multimodal.cut_at_placeholders`): it could not be fed back to the model.
    """
    device = next(model.parameters()).device
    prompts = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in prompts.items()}
    rows = repeat_rows(prompts, group_size)
    cut_ids = placeholder_ids(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos_ids[0])
    settings = dict(
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    was_training = model.training
    model.eval()
    try:
        if set(prompts) == {"input_ids", "attention_mask"}:
            chunks = _decode_text(model, prompts, group_size, batch_size, {**settings, "entropy": entropy})
        else:
            chunks = _generate_rows(model, rows, batch_size, settings, device)
    finally:
        model.train(was_training)
    C = max(c[0].shape[1] for c in chunks)
    pad = torch.nn.functional.pad
    tokens = torch.cat([pad(c[0], (0, C - c[0].shape[1]), value=pad_id) for c in chunks])  # [N, C]
    logprobs = torch.cat([pad(c[1], (0, C - c[1].shape[1]), value=0.0) for c in chunks])  # [N, C]
    cmask = cut_at_placeholders(tokens, completion_mask(tokens, eos_ids), cut_ids)  # [N, C]
    tokens, logprobs = tokens.masked_fill(~cmask, pad_id), logprobs.masked_fill(~cmask, 0.0)
    ent = None
    if all(c[2] is not None for c in chunks):
        ent = torch.cat([pad(c[2], (0, C - c[2].shape[1]), value=0.0) for c in chunks]).masked_fill(~cmask, 0.0)
    input_ids = torch.cat([rows["input_ids"], tokens], dim=1)
    attention_mask = torch.cat([rows["attention_mask"], cmask.long()], dim=1)
    extra = {k: v for k, v in rows.items() if k not in ("input_ids", "attention_mask")}
    texts = tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
    return Rollout(input_ids, attention_mask, cmask, rows["input_ids"].shape[1], extra, texts, logprobs, ent)


def _decode_text(model, prompts, group_size: int, batch_size: int | None, settings: dict):
    """[(tokens [b, c], log-probs [b, c], entropy [b, c] or None)] of text prompts, decoded in chunks of
    whole groups."""
    n = prompts["input_ids"].shape[0]
    per = max((batch_size or n * group_size) // group_size, 1)  # prompts per chunk
    out = []
    for s in range(0, n, per):
        ids, attn = prompts["input_ids"][s : s + per], prompts["attention_mask"][s : s + per]
        d = decode(model, ids, attn, group_size=group_size, **settings)
        out.append((d.tokens, d.logprobs, d.entropy))
    return out


def _generate_rows(model, rows, batch_size: int | None, settings: dict, device):
    """[(tokens [b, c], log-probs [b, c], None)] of rows with extra model inputs, ``model.generate`` in
    chunks (no entropy: generate does not give it)."""
    n = rows["input_ids"].shape[0]
    step = batch_size or n
    out = []
    for s in range(0, n, step):
        part = select_inputs(rows, list(range(s, min(s + step, n))), n)
        kwargs = model_kwargs(part, part["input_ids"], part["attention_mask"], device)
        out.append((*generate_with_logprobs(model, kwargs, **settings), None))
    return out


def pack(prompts: dict[str, Any], completions: Sequence[Sequence[int]], pad_id: int) -> Rollout:
    """A Rollout from given completion token ids (teacher forcing, e.g. supervised warm-up)."""
    C = max(1, max(len(c) for c in completions))
    n = len(completions)
    tokens = torch.full((n, C), pad_id, dtype=prompts["input_ids"].dtype)
    cmask = torch.zeros(n, C, dtype=torch.bool)
    for i, c in enumerate(completions):
        tokens[i, : len(c)] = torch.as_tensor(list(c), dtype=tokens.dtype)
        cmask[i, : len(c)] = True
    P = prompts["input_ids"].shape[1]
    extra = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask")}
    return Rollout(
        torch.cat([prompts["input_ids"], tokens], 1),
        torch.cat([prompts["attention_mask"], cmask.long()], 1),
        cmask,
        P,
        extra,
    )
