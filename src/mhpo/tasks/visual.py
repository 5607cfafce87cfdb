"""Procedural visual reasoning tasks: small images drawn with Pillow, questions with exact answers.

    count_shapes    (max_count, colours, size)  "How many red shapes?"  -> "3"
    compare_counts  (max_count, colours, size)  "More red or blue?"     -> "blue"
    bar_chart       (bars, max_value, size)     "Height of bar 2?"      -> "4"
    add_numbers     (size)                      "Sum?"                  -> "11"    (two 7-segment digits)

Each ``make(rng, **args) -> Example`` is a pure function of the numpy generator's state: the image
(size x size RGB pixels, stored as PNG bytes in ``Example.columns['image']``: a few hundred bytes,
cheap to hash into ``Example.key`` and to ship to the reward worker) and the question are drawn
together, and the answer is computed from the same draws. Shapes sit in distinct cells of a
grid of ``cell`` pixels (14 = one Qwen2-VL patch), drawn without anti-aliasing, so every shape is a
separate blob of one exact colour. The verifier is exact match on the stripped completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mhpo.tasks.base import Example
from mhpo.tasks.procedural import Arg, Procedural

CELL = 14  # pixels per grid cell: one 14 x 14 vision patch
MARGIN = 2  # free pixels around a shape inside its cell
BACKGROUND = (255, 255, 255)
# Colour names (as asked in the questions) and their exact RGB values.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 190, 0),
}
INK = (20, 20, 20)  # bars and digits


def png_bytes(image) -> bytes:
    """The PNG encoding of a PIL image (lossless; deterministic for the same pixels)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _canvas(size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    return image, ImageDraw.Draw(image)


# ---------------------------------------------------------------------------------------------
# Shapes in grid cells.


def _square(draw, box, fill) -> None:
    draw.rectangle(box, fill=fill)


def _circle(draw, box, fill) -> None:
    draw.ellipse(box, fill=fill)


def _triangle(draw, box, fill) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


SHAPES: dict[str, Callable] = {"square": _square, "circle": _circle, "triangle": _triangle}


def draw_shapes(size: int, colours: Sequence[str], rng: np.random.Generator):
    """An image with one shape per entry of ``colours``, each in its own random grid cell.

    Cells are ``CELL`` pixels; a shape is a random kind (square, circle, triangle) filling its cell
    minus ``MARGIN`` pixels on each side, shifted by up to 1 pixel. Needs len(colours) <= cells.
    """
    per_side = size // CELL
    if len(colours) > per_side * per_side:
        raise ValueError(f"{len(colours)} shapes do not fit in a {per_side}x{per_side} grid")
    image, draw = _canvas(size)
    cells = rng.permutation(per_side * per_side)[: len(colours)]
    kinds = rng.integers(0, len(SHAPES), size=len(colours))
    shifts = rng.integers(-1, 2, size=(len(colours), 2))
    for colour, cell, kind, (dx, dy) in zip(colours, cells, kinds, shifts):
        row, col = divmod(int(cell), per_side)
        x0, y0 = col * CELL + MARGIN + int(dx), row * CELL + MARGIN + int(dy)
        box = (x0, y0, x0 + CELL - 2 * MARGIN - 1, y0 + CELL - 2 * MARGIN - 1)
        list(SHAPES.values())[int(kind)](draw, box, COLOURS[colour])
    return image


def _palette(colours: int) -> list[str]:
    return list(COLOURS)[:colours]


def _check_fits(size: int, total: int) -> None:
    per_side = size // CELL
    if size % CELL or total > per_side * per_side:
        raise ValueError(
            f"size {size}: must be a multiple of {CELL} with room for {total} shapes (cells: {per_side * per_side})"
        )


def make_count(rng: np.random.Generator, *, max_count: int, colours: int, size: int) -> Example:
    """Count the shapes of one colour among shapes of ``colours`` colours.

    target colour c ~ U(palette), n_c ~ U{1..max_count}; every other colour: n ~ U{0..max_count}.
    Answer: n_c.
    """
    _check_fits(size, colours * max_count)
    palette = _palette(colours)
    target = palette[int(rng.integers(0, colours))]
    counts = {c: int(rng.integers(1 if c == target else 0, max_count + 1)) for c in palette}
    image = draw_shapes(size, [c for c in palette for _ in range(counts[c])], rng)
    return Example(f"How many {target} shapes?", str(counts[target]), {"image": png_bytes(image)})


def make_compare(rng: np.random.Generator, *, max_count: int, colours: int, size: int) -> Example:
    """Which of two colours has more shapes (counts differ; other colours are distractors).

    (a, b) ~ two distinct palette colours; n_a != n_b ~ U{1..max_count}; others ~ U{0..max_count}.
    Answer: the colour name with the larger count.
    """
    _check_fits(size, colours * max_count)
    palette = _palette(colours)
    a, b = (palette[int(i)] for i in rng.choice(colours, size=2, replace=False))
    n_a, n_b = (int(v) + 1 for v in rng.choice(max_count, size=2, replace=False))
    counts = {c: int(rng.integers(0, max_count + 1)) for c in palette}
    counts.update({a: n_a, b: n_b})
    image = draw_shapes(size, [c for c in palette for _ in range(counts[c])], rng)
    return Example(f"More {a} or {b}?", a if n_a > n_b else b, {"image": png_bytes(image)})


# ---------------------------------------------------------------------------------------------
# Bar chart and digits.


def draw_bars(size: int, values: Sequence[int], max_value: int):
    """Bars of height value * unit pixels over a baseline, in equal slots from left to right.

    unit = (size - 4) // max_value,   slot = size // len(values),   bar width = slot - 4
    """
    image, draw = _canvas(size)
    unit = (size - 4) // max_value
    slot = size // len(values)
    base = size - 2
    draw.line([(0, base + 1), (size - 1, base + 1)], fill=INK)
    for i, v in enumerate(values):
        if v > 0:
            x0 = i * slot + 2
            draw.rectangle((x0, base - v * unit + 1, x0 + slot - 5, base), fill=INK)
    return image


def make_bars(rng: np.random.Generator, *, bars: int, max_value: int, size: int) -> Example:
    """Read one bar of a bar chart: values ~ U{0..max_value} each; ask bar k ~ U{1..bars}."""
    if (size - 4) // max_value < 2 or size // bars < 6:
        raise ValueError(f"size {size} is too small for {bars} bars of up to {max_value} units")
    values = [int(v) for v in rng.integers(0, max_value + 1, size=bars)]
    k = int(rng.integers(1, bars + 1))
    return Example(f"Height of bar {k}?", str(values[k - 1]), {"image": png_bytes(draw_bars(size, values, max_value))})


# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom
# left), f (top left), g (middle) lit for each digit.
SEGMENTS: dict[int, str] = {
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}


def segment_boxes(x: int, y: int, w: int, h: int, t: int) -> dict[str, tuple[int, int, int, int]]:
    """Rectangles (x0, y0, x1, y1) of the seven segments of a digit in the box (x, y, w, h), stroke t."""
    mid = y + (h - t) // 2
    return {
        "a": (x, y, x + w - 1, y + t - 1),
        "g": (x, mid, x + w - 1, mid + t - 1),
        "d": (x, y + h - t, x + w - 1, y + h - 1),
        "f": (x, y, x + t - 1, mid + t - 1),
        "b": (x + w - t, y, x + w - 1, mid + t - 1),
        "e": (x, mid, x + t - 1, y + h - 1),
        "c": (x + w - t, mid, x + w - 1, y + h - 1),
    }


def draw_digits(size: int, digits: Sequence[int]):
    """The digits side by side as seven-segment figures (stroke = size // 14)."""
    image, draw = _canvas(size)
    slot = size // len(digits)
    t = max(2, size // 14)
    w, h = slot - 2 * t, size - 4 * t
    for i, d in enumerate(digits):
        boxes = segment_boxes(i * slot + t, 2 * t, w, h, t)
        for seg in SEGMENTS[int(d)]:
            draw.rectangle(boxes[seg], fill=INK)
    return image


def make_add(rng: np.random.Generator, *, size: int) -> Example:
    """Add two rendered digits a, b ~ U{0..9}: answer a + b."""
    if size < 28:
        raise ValueError(f"size {size} is too small for two digits (>= 28)")
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    return Example("Sum?", str(a + b), {"image": png_bytes(draw_digits(size, [a, b]))})


SIZE = Arg(56, 28, 448, "image side in pixels (count/compare: a multiple of 14)")

VISUAL: dict[str, Procedural] = {
    "count_shapes": Procedural(
        make_count,
        {
            "max_count": Arg(5, 1, 9, "largest count asked"),
            "colours": Arg(3, 1, len(COLOURS), "colours in the image"),
            "size": SIZE,
        },
        lambda **_: 2,
        "count the shapes of one colour in an image, e.g. 'How many red shapes?' -> 3",
    ),
    "compare_counts": Procedural(
        make_compare,
        {
            "max_count": Arg(5, 2, 9, "largest count"),
            "colours": Arg(3, 2, len(COLOURS), "colours in the image"),
            "size": SIZE,
        },
        lambda colours, **_: max(len(c) for c in _palette(colours)) + 1,
        "which of two colours has more shapes, e.g. 'More red or blue?' -> blue",
    ),
    "bar_chart": Procedural(
        make_bars,
        {"bars": Arg(4, 2, 8, "bars in the chart"), "max_value": Arg(5, 1, 9, "largest bar value"), "size": SIZE},
        lambda **_: 2,
        "read a bar of a bar chart, e.g. 'Height of bar 2?' -> 4",
    ),
    "add_numbers": Procedural(
        make_add, {"size": SIZE}, lambda **_: 3, "add two rendered seven-segment digits, e.g. 'Sum?' -> 11"
    ),
}
