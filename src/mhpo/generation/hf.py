"""``model.generate`` with the sampler's log-probs, for prompts with extra model inputs (images).

The decode loop (:mod:`mhpo.generation.decode`) feeds text only; a vision-language model needs its
pixels, image grids and 3-D positions handled by its own ``generate``. That runs with a neutral
generation config (:func:`sampling_config`) and one extra logits processor,
:class:`LogprobRecorder`, which sees each step's raw logits before any warper and records

    logp_t = log softmax(logits_t / T)[y_t]        float32, the full tempered distribution

the same recipe as :func:`mhpo.generation.sampling.pick_tokens`, holding one step's [n, V] logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mhpo.generation.sampling import token_logprobs
from mhpo.models.device import cast_weights_once


def sampling_config(
    model, *, do_sample: bool, temperature: float, top_p: float, top_k: int, max_new_tokens: int, eos_ids, pad_id: int
):
    """A GenerationConfig with nothing but the sampling we train on (no penalties, no filters)."""
    from transformers import GenerationConfig

    kwargs = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        use_cache=True,
    )
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(do_sample=False)
    return GenerationConfig(**kwargs)


class LogprobRecorder:
    """A logits processor that leaves the scores as they are and records the sampled tokens' log-probs.

    Called at step t with input_ids [n, P + t] and the raw logits [n, V] of step t, it scores the
    token step t-1 sampled (the last column of input_ids) under step t-1's tempered logits;
    :meth:`finish` scores the last step's token from the returned sequences.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.z: torch.Tensor | None = None  # [n, V] the previous step's tempered logits
        self.steps: list[torch.Tensor] = []  # [n] float32 per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._score(input_ids[:, -1])
        z = scores.float()
        self.z = z if self.temperature == 1.0 else z / self.temperature
        return scores

    def _score(self, tokens: torch.Tensor) -> None:
        if self.z is not None:
            self.steps.append(token_logprobs(self.z, tokens))
            self.z = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:  # [n, C] float32, one column per step
        self._score(sequences[:, -1])
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0, dtype=torch.float32, device=sequences.device)
        return torch.stack(self.steps, 1)


@torch.no_grad()
def generate_with_logprobs(
    model,
    model_inputs: dict,  # input_ids [n, P], attention_mask [n, P] and the extra inputs, ready for generate
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n, C] tokens, [n, C] float32 log-probs)
    """``model.generate`` of the completions, and log softmax(logits / T)[token] of each token."""
    from transformers import LogitsProcessorList

    cfg = sampling_config(
        model,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    recorder = LogprobRecorder(temperature)
    with cast_weights_once(next(model.parameters()).device):
        out = model.generate(**model_inputs, generation_config=cfg, logits_processor=LogitsProcessorList([recorder]))
    tokens = out[:, model_inputs["input_ids"].shape[1] :]  # [n, C]
    return tokens, recorder.finish(out)
