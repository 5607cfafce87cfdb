"""Vision-language models: a tiny Qwen2.5-VL built locally, its processor, and loading real ones.

The tiny VLM is the real ``Qwen2_5_VLForConditionalGeneration`` with a small config, so the
trainer's vision path is exactly the one Qwen2.5-VL users hit: the processor expands each
``<|image_pad|>`` into one token per merged patch group, the vision tower encodes ``pixel_values``
(one row per 14x14 patch, [sum_i patches_i, 3 * 2 * 14 * 14]) given ``image_grid_thw`` ([images, 3]),
and the language model uses 3-D (temporal, height, width) rotary positions ("mrope") that the model
computes itself from ``mm_token_type_ids``, ``image_grid_thw`` and the attention mask.

    image S x S px  ->  (S/14)^2 patches  ->  (S/28)^2 image tokens     (merge 2 x 2 patches)
    56 x 56 px      ->  16 patches        ->  4 image tokens

Processor without torchvision: ``Qwen2_5_VLProcessor`` insists on a video processor, and the only
Qwen video processor needs torchvision. :class:`ImageTextProcessor` is the same processor with the
video part left out (``processor(text=..., images=..., return_tensors="pt")`` -> input_ids,
attention_mask, mm_token_type_ids, pixel_values, image_grid_thw). It saves as a standard
Qwen2.5-VL processor (``processor_class: Qwen2_5_VLProcessor``), so ``AutoProcessor`` rebuilds the
stock processor wherever torchvision is installed; :func:`load_processor` falls back to this class
where it is not (``AutoTokenizer`` loads the tokenizer alone everywhere).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from mhpo.models.multimodal import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, text_tokenizer
from mhpo.models.tiny import seeded_init, tiny_text_config
from mhpo.models.tokens import align_special_tokens, neutral_generation_config

VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# The tiny model's chat template: no role markup (every token costs time on a CPU), an image item
# becomes <|vision_start|><|image_pad|><|vision_end|> (expanded by the processor), text items are
# copied, a string content is copied, and the generation prompt is "=" (as in "count: 3").
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    + VISION_START
    + IMAGE_PAD
    + VISION_END
    + "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if not loop.last -%}\n{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}={%- endif -%}"
)


# ---------------------------------------------------------------------------------------------
# Processor.


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images and text only (no video processor, so no torchvision).

    Saved as ``processor_class: Qwen2_5_VLProcessor``: the files are those of a stock Qwen2.5-VL
    processor (tokenizer, ``preprocessor_config.json``, chat template), minus the video config.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = Qwen2_5_VLProcessor.__name__
        return out


def build_image_processor(image_size: int, *, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """A Qwen2-VL image processor (Pillow backend) that resizes every image to image_size^2 pixels.

    min_pixels = max_pixels = image_size^2, so a square image of any size becomes
    (image_size / patch_size)^2 patches; image_size must be a multiple of patch_size * merge_size.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = patch_size * merge_size
    if image_size < unit or image_size % unit:
        raise ValueError(f"image size {image_size} must be a positive multiple of patch_size * merge_size = {unit}")
    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels,
        max_pixels=pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )


def build_vlm_tokenizer():
    """The character tokenizer (:func:`mhpo.models.tokenizer.build_char_tokenizer`) plus the four vision
    special tokens (ids len(chars) + 4 .. + 7) and :data:`TINY_CHAT_TEMPLATE`."""
    from mhpo.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_tiny_processor(image_size: int, *, patch_size: int = 14, merge_size: int = 2) -> ImageTextProcessor:
    """Character tokenizer + vision tokens + an image processor at image_size^2 pixels."""
    tok = build_vlm_tokenizer()
    image_processor = build_image_processor(image_size, patch_size=patch_size, merge_size=merge_size)
    return ImageTextProcessor(image_processor=image_processor, tokenizer=tok, chat_template=TINY_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# The tiny model.


def mrope_section(head_dim: int) -> list[int]:
    """Split of the rotary frequencies (head_dim / 2 of them) between the temporal, height and width
    positions, in Qwen2.5-VL's proportions 1/4 : 3/8 : 3/8 (16 : 24 : 24 at head_dim 128)."""
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise ValueError(f"head_dim {head_dim} must be even and >= 6 for 3-D rotary positions")
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_qwen2_5_vl(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_positions: int = 256,
    vision_depth: int = 1,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    vision_intermediate_size: int = 128,
    patch_size: int = 14,
    merge_size: int = 2,
    seed: int = 0,
):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (~0.7M parameters at the defaults).

    Vision tower: ``vision_depth`` blocks of width ``vision_hidden_size``, all with full attention
    (one window covers the small images), then the 2x2 patch merger into the LM width. Language model:
    ``num_layers`` decoder layers, mrope split :func:`mrope_section`, tied input/output embeddings.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in zip(("start", "end", "image", "video"), VISION_TOKENS)
    }
    if tokenizer.unk_token_id in ids.values():
        raise ValueError(f"the tokenizer lacks the vision tokens {', '.join(VISION_TOKENS)}")
    text = tiny_text_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_positions=max_positions,
    )
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": mrope_section(hidden_size // num_heads),
    }
    special = {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_heads=vision_heads,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        window_size=112,
        fullatt_block_indexes=list(range(vision_depth)),
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        tie_word_embeddings=True,
        **special,
    )
    return seeded_init(Qwen2_5_VLForConditionalGeneration, config, seed)


def build_tiny_vlm(tiny_cfg, vision_cfg, seed: int):
    """(model, processor): a seeded tiny Qwen2.5-VL and its processor.

    ``tiny_cfg`` has the LM fields of ``model.tiny`` (hidden_size, num_layers, num_heads,
    num_kv_heads, intermediate_size, max_positions); ``vision_cfg`` has image_size, patch_size,
    depth, hidden_size, num_heads, intermediate_size.
    """
    processor = build_tiny_processor(vision_cfg.image_size, patch_size=vision_cfg.patch_size)
    model = tiny_qwen2_5_vl(
        processor.tokenizer,
        hidden_size=tiny_cfg.hidden_size,
        num_layers=tiny_cfg.num_layers,
        num_heads=tiny_cfg.num_heads,
        num_kv_heads=tiny_cfg.num_kv_heads,
        intermediate_size=tiny_cfg.intermediate_size,
        max_positions=tiny_cfg.max_positions,
        vision_depth=vision_cfg.depth,
        vision_hidden_size=vision_cfg.hidden_size,
        vision_heads=vision_cfg.num_heads,
        vision_intermediate_size=vision_cfg.intermediate_size,
        patch_size=vision_cfg.patch_size,
        seed=seed,
    )
    neutral_generation_config(model)
    return model, processor


# ---------------------------------------------------------------------------------------------
# Loading saved / pretrained vision-language models.


def is_vision_language(config) -> bool:
    """True for a model config with a vision tower (``vision_config``): an image-text-to-text model."""
    return getattr(config, "vision_config", None) is not None


def load_processor(path: str, *, trust_remote_code: bool = False, **image_kwargs):
    """The processor of a vision-language model dir or hub id.

    ``AutoProcessor`` first; if that fails only for lack of a video backend (torchvision), an
    :class:`ImageTextProcessor` from the same files. ``image_kwargs`` (e.g. ``max_pixels``) go to
    the image processor.
    """
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **image_kwargs)
    except (ImportError, OSError, TypeError, ValueError) as err:  # OSError: "Can't load video processor"
        if "torchvision" not in str(err) and "video" not in str(err).lower():
            raise
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = pil_image_processor(path, **image_kwargs)
    return ImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def pil_image_processor(path: str, **image_kwargs):
    """The Pillow-backend image processor named by a model's saved config, without torchvision.

    Without torchvision ``AutoImageProcessor`` itself is unavailable; the saved
    ``image_processor_type`` (e.g. ``Qwen2VLImageProcessor`` or ``...Fast``) names the family, and
    transformers' ``<Family>Pil`` class loads the same settings.
    """
    import transformers
    from transformers.image_processing_base import ImageProcessingMixin

    saved, _ = ImageProcessingMixin.get_image_processor_dict(path)
    kind = str(saved.get("image_processor_type") or "")
    family = kind.removesuffix("Fast").removesuffix("Pil")
    cls = getattr(transformers, family + "Pil", None)
    if cls is None:
        raise ValueError(
            f"image processor {kind or '(unnamed)'!r} of {path!r} has no Pillow version ({family}Pil); "
            "install a torchvision build that matches your torch"
        )
    return cls.from_pretrained(path, **image_kwargs)


def load_pretrained_vlm(
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **image_kwargs,
):
    """(model, processor) of an image-text-to-text model (e.g. a Qwen2.5-VL checkpoint); the pad
    token and the end of a completion are aligned as for text models
    (:func:`mhpo.models.tokens.align_special_tokens`)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path, trust_remote_code=trust_remote_code, **image_kwargs)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(device)
    align_special_tokens(model, text_tokenizer(processor))
    neutral_generation_config(model)
    return model, processor
