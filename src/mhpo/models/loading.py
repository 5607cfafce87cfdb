"""Load a pretrained policy, text or vision-language, from wherever it is.

    smollm2-135m-instruct        a named model from a PyPI wheel (converted once, :mod:`mhpo.models.sources`)
    path/to/model.gguf           a GGUF file (dequantised on every load)
    path/to/dir | org/name       a transformers model directory or hub id; a config with a
                                 ``vision_config`` loads as a vision-language model (:mod:`mhpo.models.vlm`)

This module sits above :mod:`mhpo.models` (text models, devices, precision) and :mod:`mhpo.models.vlm`
(which builds on models), so neither has to import the other's caller.
"""

from __future__ import annotations

import torch

from mhpo.models.sources import NAMED_MODELS, ensure_named_model, is_gguf, load_gguf
from mhpo.models.tokens import align_special_tokens, neutral_generation_config


def load_pretrained(
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    log=None,
):
    """(model, tokenizer) from a named model, a GGUF file, a local directory or a hub id.

    A named model is converted once into the cache (:func:`mhpo.models.sources.ensure_named_model`)
    and loaded from there; a GGUF file is dequantised on every load (``log`` says so). The pad token
    is made explicit (:func:`align_special_tokens`). A vision-language model (its config has a
    ``vision_config``, e.g. Qwen2.5-VL or a tiny-vlm checkpoint) is loaded with
    :func:`mhpo.models.vlm.load_pretrained_vlm` and comes with its processor in place of the tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mhpo.models.vlm import is_vision_language, load_pretrained_vlm  # transformers' VLM classes: imported only here

    if path in NAMED_MODELS:
        path = str(ensure_named_model(path, log=log))
    if is_gguf(path):
        model, tokenizer = load_gguf(path, log=log)
        model = model.to(device=device, dtype=dtype)
    else:
        if is_vision_language(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)):
            return load_pretrained_vlm(
                path,
                dtype=dtype,
                device=device,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    align_special_tokens(model, tokenizer)
    neutral_generation_config(model)
    return model, tokenizer
