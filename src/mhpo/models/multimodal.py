"""Images in prompts: loading them, and the extra model inputs a vision-language model needs.

A prompt batch for a Qwen2-VL-family model (``processor(text=..., images=...)``) carries, besides
``input_ids`` / ``attention_mask`` [B, P]:

    pixel_values       [sum_i patches_i, D]   one row per image patch, images of all rows concatenated
    image_grid_thw     [sum_i images_i, 3]    (t, h, w) patch grid of each image
    mm_token_type_ids  [B, P]                 0 text, 1 image, 2 video, per token

None of these is "batch-major" (one row per sequence), so the trainer cannot slice or repeat them
like input_ids. Here they are held as:

    :class:`Ragged`       one tensor per sequence (its patches, its grids); sliced and repeated per
                          sequence, concatenated along dim 0 for the model
    :class:`TokenTypes`   derived from the input_ids of each forward pass, so it always matches the
                          sequence actually fed (trimmed columns, completion tokens appended)
    ``MODEL_POSITIONS``   under ``position_ids``: the model computes its own position ids (Qwen's 3-D
                          "mrope" positions from mm_token_type_ids, image_grid_thw and the attention
                          mask, with left padding skipped) -- the same ones ``generate`` used

:func:`select_inputs`, :func:`repeat_inputs` and :func:`model_kwargs` apply to every kind of value
(plain batch-major tensors included), so text-only and vision-language batches take one code path.
:class:`VisionPromptEncoder` turns examples whose ``columns`` hold an image into such a batch.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Qwen2-VL / Qwen2.5-VL's vision markers: an image is <|vision_start|><|image_pad|><|vision_end|> in
# the prompt, and the processor expands the pad into one token per merged patch group.
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"

IMAGE_COLUMN = "image"


# ---------------------------------------------------------------------------------------------
# Extra model inputs.


@dataclass(frozen=True)
class Ragged:
    """A batch input with a variable number of leading entries per sequence (row i: ``rows[i]``).

    For the model: ``torch.cat(rows)`` -- e.g. pixel_values [sum_i patches_i, D].
    """

    rows: tuple[torch.Tensor, ...]

    @classmethod
    def split(cls, flat: torch.Tensor, counts: Sequence[int]) -> Ragged:
        """Row i gets the next counts[i] entries of ``flat`` (sum(counts) == len(flat))."""
        if sum(counts) != flat.shape[0]:
            raise ValueError(f"row counts sum to {sum(counts)}, but the tensor has {flat.shape[0]} entries")
        return cls(tuple(torch.split(flat, list(counts))))

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: Sequence[int]) -> Ragged:
        return Ragged(tuple(self.rows[i] for i in idx))

    def repeat_interleave(self, repeats: int) -> Ragged:
        """Row i -> rows i*repeats .. i*repeats + repeats - 1 (as ``Tensor.repeat_interleave``)."""
        return Ragged(tuple(r for r in self.rows for _ in range(repeats)))

    def collate(self) -> torch.Tensor:
        return torch.cat(self.rows)


@dataclass(frozen=True)
class TokenTypes:
    """``mm_token_type_ids`` of a sequence, derived from its token ids:

        type_t = 1 if id_t == image_token_id, 2 if id_t == video_token_id, else 0      [B, L]

    (as ``ProcessorMixin.create_mm_token_type_ids`` computes it).
    """

    image_token_id: int
    video_token_id: int | None = None

    def derive(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        types = (input_ids == self.image_token_id).long()
        if self.video_token_id is not None:
            types = types + 2 * (input_ids == self.video_token_id).long()
        return types


@dataclass(frozen=True)
class ModelPositions:
    """Under ``position_ids``: pass none, the model computes its own (see the module docstring)."""

    def derive(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        return None


MODEL_POSITIONS = ModelPositions()
DERIVED = (TokenTypes, ModelPositions)


def placeholder_ids(inputs: Mapping[str, Any]) -> list[int]:
    """Token ids that stand for image / video features in a batch (those of its TokenTypes)."""
    out: list[int] = []
    for value in inputs.values():
        if isinstance(value, TokenTypes):
            out += [i for i in (value.image_token_id, value.video_token_id) if i is not None]
    return out


def cut_at_placeholders(tokens: torch.Tensor, mask: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """[N, C] completion mask ending right before the first sampled placeholder token of each row.

        mask'_t = mask_t and (no token in ``ids`` at positions <= t)

    A completion that samples ``<|image_pad|>`` cannot be fed back to the model (it would claim
    image features that do not exist), so it ends there, like a completion cut at max_new_tokens:
    every kept token's log-prob is still exact, the placeholder gets no gradient.
    """
    if not ids:
        return mask
    hit = torch.isin(tokens, torch.as_tensor(list(ids), device=tokens.device))
    return mask & (hit.long().cumsum(-1) == 0)


def select_inputs(inputs: Mapping[str, Any], idx: torch.Tensor | Sequence[int], n: int) -> dict[str, Any]:
    """Rows ``idx`` of every per-sequence value of a batch of ``n`` sequences.

    Tensors whose first dim is n are indexed, Ragged values select their rows; anything else
    (derived inputs, non-batch tensors) is kept as is.
    """
    index = torch.as_tensor(idx, dtype=torch.long)
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.shape[:1] == (n,):
            out[key] = value[index]
        elif isinstance(value, Ragged):
            out[key] = value.select(index.tolist())
        else:
            out[key] = value
    return out


def repeat_inputs(inputs: Mapping[str, Any], repeats: int, n: int) -> dict[str, Any]:
    """Every per-sequence value repeated ``repeats`` times per row (row i -> i*G .. i*G + G-1)."""
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.shape[:1] == (n,):
            out[key] = value.repeat_interleave(repeats, dim=0)
        elif isinstance(value, Ragged):
            out[key] = value.repeat_interleave(repeats)
        else:
            out[key] = value
    return out


def model_kwargs(
    inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, device=None
) -> dict[str, Any]:
    """Keyword inputs for ``model(...)`` / ``model.generate(...)`` over (input_ids, attention_mask).

    Ragged values are concatenated (left out when they hold no entry, e.g. a text-only batch),
    derived values are computed from ``input_ids`` and ``attention_mask`` (left out when None),
    tensors are moved to ``device``.
    """
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Ragged):
            value = value.collate() if any(r.shape[0] for r in value.rows) else None
        elif isinstance(value, DERIVED):
            value = value.derive(input_ids, attention_mask)
        if value is None:
            continue
        out[key] = value.to(device) if device is not None and torch.is_tensor(value) else value
    return out


def has_images(examples) -> bool:
    """Whether a task's or benchmark's examples carry images (judged by the first: one modality per set)."""
    return any(ex.columns.get(IMAGE_COLUMN) is not None for ex in list(examples)[:1])


def text_tokenizer(tokenizer_or_processor):
    """The text tokenizer of a processor (``processor.tokenizer``), or the tokenizer itself."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


# ---------------------------------------------------------------------------------------------
# Images.


def load_image(value, root: str | os.PathLike | None = None):
    """An RGB ``PIL.Image`` from a path (relative paths resolved against ``root``), raw bytes, a
    Hugging Face ``Image`` feature dict ({"bytes", "path"}), or a PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(value)), "<bytes>")
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        return load_image(value["bytes"] if value.get("bytes") is not None else value["path"], root)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        if not path.is_file():
            raise ValueError(
                f"image {str(value)!r} does not exist" + (f" (looked in {str(root)!r})" if root is not None else "")
            )
        return _open(path, str(path))
    raise ValueError(
        f"an image must be a path, bytes, a {{'bytes', 'path'}} dict or a PIL image, got {type(value).__name__}"
    )


def _open(source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image {name!r} could not be read ({type(err).__name__})") from None


def image_key(value) -> str:
    """A short stable identity of an image value (path string, or a digest of bytes / pixels), so
    that prompts with the same text and different images count as different prompts."""
    from PIL import Image

    if isinstance(value, (list, tuple)):
        return ",".join(image_key(v) for v in value)
    if isinstance(value, Image.Image):
        h = hashlib.sha1(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
        return h.hexdigest()[:16]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return hashlib.sha1(bytes(value)).hexdigest()[:16]
    if isinstance(value, Mapping):
        return image_key(value["bytes"] if value.get("bytes") is not None else value.get("path"))
    return str(value)


def example_images(columns: Mapping[str, Any], column: str = IMAGE_COLUMN, root=None) -> list:
    """The images of one example: ``columns[column]`` is one image, a list of them, or absent."""
    value = columns.get(column)
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [load_image(v, root) for v in values]


# ---------------------------------------------------------------------------------------------
# Prompts with images.


def image_messages(prompt, n_images: int, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for a prompt with ``n_images`` images.

    A string prompt becomes one user turn: n image items, then the text. Chat messages are kept;
    when none of them has an image item, the images are put before the first user turn's text.
    """
    images = [{"type": "image"} for _ in range(n_images)]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": [*images, {"type": "text", "text": prompt}]}]
    else:
        messages = [dict(m) for m in prompt]
        has_image = any(
            isinstance(m.get("content"), list) and any(c.get("type") == "image" for c in m["content"]) for m in messages
        )
        if n_images and not has_image:
            first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), 0)
            content = messages[first].get("content")
            text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            messages[first] = {**messages[first], "content": [*images, *text]}
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


class VisionPromptEncoder:
    """Examples -> a left-padded prompt batch with pixel inputs, for a Qwen2-VL-family processor.

    Example i's images are ``example.columns[image_column]`` (one image or a list: paths, bytes,
    PIL images, see :func:`load_image`). Output keys: input_ids [B, P], attention_mask [B, P],
    pixel_values (Ragged), image_grid_thw (Ragged), mm_token_type_ids (TokenTypes), position_ids
    (MODEL_POSITIONS). Same interface as :class:`mhpo.generation.rollout.PromptEncoder` (``render``, call).
    """

    def __init__(
        self,
        processor,
        *,
        chat: bool = True,
        system_prompt: str | None = None,
        image_column: str = IMAGE_COLUMN,
        image_root: str | os.PathLike | None = None,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat = chat
        self.system_prompt = system_prompt
        self.image_column = image_column
        self.image_root = image_root

    def _count(self, example) -> int:
        value = example.columns.get(self.image_column)
        return 0 if value is None else len(value) if isinstance(value, (list, tuple)) else 1

    def render(self, example) -> str:
        """The prompt text with one ``<|vision_start|><|image_pad|><|vision_end|>`` per image
        (before the processor expands each pad into the image's tokens)."""
        n = self._count(example)
        if self.chat:
            messages = image_messages(example.prompt, n, self.system_prompt)
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(example.prompt, str):
            raise ValueError("a prompt given as chat messages needs a processor with a chat template")
        return f"{VISION_START}{self.processor.image_token}{VISION_END}" * n + example.prompt

    def __call__(self, examples: Sequence) -> dict[str, Any]:
        texts = [self.render(ex) for ex in examples]
        per_row = [example_images(ex.columns, self.image_column, self.image_root) for ex in examples]
        images = [im for row in per_row for im in row]
        enc = self.processor(
            text=texts,
            images=images or None,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=not self.chat,
        )
        out: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        n_images = [len(row) for row in per_row]
        if images:
            grid = enc["image_grid_thw"]  # [sum images, 3]
            patches = grid.prod(-1)  # [sum images]
            per_row_patches = [int(p.sum()) for p in torch.split(patches, n_images)]
            out["pixel_values"] = Ragged.split(enc["pixel_values"], per_row_patches)
            out["image_grid_thw"] = Ragged.split(grid, n_images)
        out["mm_token_type_ids"] = TokenTypes(
            self.processor.image_token_id, getattr(self.processor, "video_token_id", None)
        )
        out["position_ids"] = MODEL_POSITIONS
        return out
