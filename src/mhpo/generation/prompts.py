"""Prompts in, token tensors out: the chat template (or none), an optional system prompt, left padding;
and the tokens that end a completion. The prompt encoder of a vision-language model (prompts with
images) is :class:`mhpo.models.multimodal.VisionPromptEncoder`; :func:`build_encoder` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mhpo.tasks.base import Example


class PromptEncoder:
    """Examples -> left-padded prompt tensors (+ extra model inputs), chat template when asked.

    Text only; for prompts with images see :func:`build_encoder`.
    """

    def __init__(self, tokenizer, *, chat: bool, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.chat = chat
        self.system_prompt = system_prompt

    def render(self, example: Example) -> str:
        """The prompt text the model sees (chat template applied when ``chat``)."""
        prompt = example.prompt
        if not self.chat:
            if not isinstance(prompt, str):
                raise ValueError("a prompt given as chat messages needs a tokenizer with a chat template")
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = [self.render(ex) for ex in examples]
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
        finally:
            tok.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def build_encoder(tokenizer_or_processor, *, chat_template: str, system_prompt: str | None = None):
    """The prompt encoder for a model's tokenizer (:class:`PromptEncoder`) or its image processor
    (:class:`mhpo.models.multimodal.VisionPromptEncoder`, for a processor with an ``image_processor``);
    ``chat_template`` is model.chat_template (auto | on | off)."""
    chat = use_chat_template(chat_template, tokenizer_or_processor)
    if getattr(tokenizer_or_processor, "image_processor", None) is not None:
        from mhpo.models.multimodal import VisionPromptEncoder

        return VisionPromptEncoder(tokenizer_or_processor, chat=chat, system_prompt=system_prompt)
    return PromptEncoder(tokenizer_or_processor, chat=chat, system_prompt=system_prompt)


def use_chat_template(mode: str, tokenizer) -> bool:
    """model.chat_template: 'auto' = when the tokenizer has a template; 'on' requires one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise ValueError("model.chat_template=on but the tokenizer has no chat template")
    return has if mode == "auto" else mode == "on"


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the generation config's EOS id(s) and the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("the tokenizer and the model's generation config define no EOS token")
    return list(dict.fromkeys(int(i) for i in ids))
