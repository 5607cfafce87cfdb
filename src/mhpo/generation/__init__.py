"""Sampling completions from a causal LM: the decode loop (text prompts) and ``model.generate`` with the
sampler's log-probs (prompts with extra model inputs, e.g. images). Both return each sampled token's
log softmax(logits / T)[token] in float32 under the full tempered distribution."""

from mhpo.generation.decode import Decoded, decode, position_ids
from mhpo.generation.hf import generate_with_logprobs, sampling_config
from mhpo.generation.sampling import pick_tokens, truncate

__all__ = ["Decoded", "decode", "generate_with_logprobs", "pick_tokens", "position_ids", "sampling_config", "truncate"]
