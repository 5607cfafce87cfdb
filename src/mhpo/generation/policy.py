"""The one way a policy is loaded for sampling, training or evaluation: model, tokenizer, prompt
encoder, end tokens and precision, from any source.

    policy = load_policy("smollm2-135m-instruct", precision=resolve_precision("auto", cpu), device=cpu,
                         chat_template="auto")
    with policy.autocast():
        rollout = sample(policy.model, policy.tokenizer, policy.encoder(examples), eos_ids=policy.eos_ids, ...)

``mhpo train`` (the initial policy, a checkpoint, the KL reference), ``mhpo eval RUN_DIR`` and
``mhpo eval --model`` all call :func:`load_policy`; the built-in tiny models come in through
``builders`` (their weights depend on the run's seed, which only the trainer knows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mhpo.generation.prompts import build_encoder, eos_token_ids
from mhpo.models.allocator import keep_freed_memory
from mhpo.models.attention import use_cpu_attention
from mhpo.models.device import Precision
from mhpo.models.loading import load_pretrained
from mhpo.models.lora import adapter_base, load_adapter
from mhpo.models.multimodal import text_tokenizer


@dataclass
class LoadedPolicy:
    """A model ready to sample: what generation, log-probs and evaluation need from it."""

    model: Any
    processor: Any  # what is saved with the model: the tokenizer, or a vision-language model's processor
    tokenizer: Any  # the text tokenizer (the processor's, for a vision-language model)
    encoder: Any  # prompts.PromptEncoder or multimodal.VisionPromptEncoder
    eos_ids: list[int]  # every token that ends a completion
    precision: Precision  # weights' dtype and autocast (bf16-mixed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vision(self) -> bool:
        """Whether prompts may carry images (the processor has an image processor)."""
        return getattr(self.processor, "image_processor", None) is not None

    def autocast(self):
        """The autocast context of every forward pass (a no-op unless bf16-mixed)."""
        return self.precision.context(self.device)


def load_weights(
    source: str,
    *,
    precision: Precision,
    device: torch.device,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    builders: dict[str, Callable[[], tuple[Any, Any]]] | None = None,
    log: Callable[[str], None] | None = None,
    base: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer or processor) of ``source`` in ``precision.weights`` on ``device``: a name in
    ``builders`` builds it, anything else goes to :func:`mhpo.models.loading.load_pretrained` (a named
    model, a GGUF file, a model or checkpoint directory, a hub id). A directory of LoRA adapters (a LoRA
    run's checkpoint: adapter_config.json) loads its base model, ``base`` or else the one its adapter
    config names, and attaches the adapters (a peft model). On a CPU a text model's attention is
    :mod:`mhpo.models.attention`'s, and the process keeps freed memory for reuse
    (:mod:`mhpo.models.allocator`). ValueError (one line) when it fails."""
    named_base = adapter_base(source)
    if named_base is not None:
        kwargs = dict(precision=precision, device=device, trust_remote_code=trust_remote_code)
        kwargs.update(attn_implementation=attn_implementation, builders=builders, log=log)
        model, processor = load_weights(base or named_base, **kwargs)
        try:
            return load_adapter(model, source), processor
        except (OSError, ValueError) as err:
            raise ValueError(f"adapters {source!r} could not be loaded: {str(err).splitlines()[0]}") from None
    try:
        if builders and source in builders:
            model, processor = builders[source]()
            model = model.to(device=device, dtype=precision.weights)
        else:
            model, processor = load_pretrained(
                source,
                dtype=precision.weights,
                device=device,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                log=log,
            )
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model {source!r} could not be loaded: {first}") from None
    if device.type == "cpu":
        use_cpu_attention(model)  # no repeated KV heads; float32 under bf16 (mhpo.models.attention)
        keep_freed_memory()  # no page faults for each step's large buffers (mhpo.models.allocator)
    return model, processor


def wrap_policy(
    model, processor, *, precision: Precision, chat_template: str, system_prompt: str | None = None
) -> LoadedPolicy:
    """The :class:`LoadedPolicy` of loaded weights: its prompt encoder (model.chat_template: auto | on |
    off), text tokenizer and end tokens."""
    encoder = build_encoder(processor, chat_template=chat_template, system_prompt=system_prompt)
    tokenizer = text_tokenizer(processor)
    return LoadedPolicy(model, processor, tokenizer, encoder, eos_token_ids(model, tokenizer), precision)


def load_policy(
    source: str,
    *,
    precision: Precision,
    device: torch.device,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    builders: dict[str, Callable[[], tuple[Any, Any]]] | None = None,
    log: Callable[[str], None] | None = None,
    base: str | None = None,
) -> LoadedPolicy:
    """:func:`load_weights` then :func:`wrap_policy`. ValueError (one line) on any problem."""
    model, processor = load_weights(
        source,
        precision=precision,
        device=device,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        builders=builders,
        log=log,
        base=base,
    )
    return wrap_policy(model, processor, precision=precision, chat_template=chat_template, system_prompt=system_prompt)


def quiet_transformers() -> None:
    """No per-file progress bars from transformers when loading or saving models (ours are enough)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
