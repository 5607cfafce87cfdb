"""Special tokens and generation defaults of a loaded model: an explicit pad token, the ends of a
completion that tokenizer and generation config disagree on (warned once), neutral sampling
defaults so that only the trainer's settings take effect."""

from __future__ import annotations

import sys

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``message`` as a warning the first time it comes up in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"mhpo: warning: {message}", file=sys.stderr)


def align_special_tokens(model, tokenizer) -> None:
    """Make the tokenizer's pad token explicit and warn (once) where it and the generation config
    disagree on the end of a completion.

    Completions end at every EOS id of either (:func:`mhpo.generation.rollout.eos_token_ids`). A missing pad
    token becomes the generation config's pad, else its first EOS, else the tokenizer's EOS: a
    converted GGUF's tokenizer may name the chat template's turn *start* as its EOS (SmolLM2:
    ``<|im_start|>``) while the generation config ends turns at ``<|im_end|>``.
    """
    gen = getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    tok_eos = tokenizer.eos_token_id
    name = lambda i: repr(tokenizer.convert_ids_to_tokens(int(i)))  # noqa: E731
    notes = []
    if tok_eos is not None and gen_eos and tok_eos not in gen_eos:
        notes.append(
            f"the tokenizer's eos {name(tok_eos)} (id {tok_eos}) differs from the generation config's "
            f"{', '.join(f'{name(i)} (id {i})' for i in gen_eos)}; completions end at any of them"
        )
    if tokenizer.pad_token_id is None:
        gen_pad = getattr(gen, "pad_token_id", None)
        pad = gen_pad if gen_pad is not None else (gen_eos[0] if gen_eos else tok_eos)
        if pad is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
            if notes or pad != tok_eos:
                notes.append(f"the tokenizer has no pad token: padding with {name(pad)} (id {pad})")
    if notes:
        warn_once("; ".join(notes))


def neutral_generation_config(model) -> None:
    """Replace the model's generation defaults (sampling presets, penalties) by neutral ones, keeping
    its special token ids, so that only the sampling settings the trainer passes take effect."""
    from transformers import GenerationConfig

    old = getattr(model, "generation_config", None)
    keep = {
        k: getattr(old, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    }
    model.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})
