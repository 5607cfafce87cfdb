"""Procedural visual tasks: determinism, answers checked against the pixels, keys, scoring, registry."""

from __future__ import annotations

import io
from collections import deque

import numpy as np
import pytest
from PIL import Image

from mhpo.rewards.functions import exact_match
from mhpo.tasks import build_task, task_names
from mhpo.tasks.visual import COLOURS, INK, VISUAL, make_bars, make_compare, make_count
from mhpo.trainer.config import load_config


def pixels(example) -> np.ndarray:
    """[S, S, 3] uint8 pixels of an example's PNG image."""
    return np.asarray(Image.open(io.BytesIO(example.columns["image"])).convert("RGB"))


def blobs(image: np.ndarray, rgb) -> int:
    """Number of 4-connected regions of pixels exactly equal to ``rgb``."""
    hit = (image == np.asarray(rgb, dtype=np.uint8)).all(-1)
    seen = np.zeros_like(hit)
    count = 0
    for y, x in zip(*np.nonzero(hit)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < hit.shape[0] and 0 <= nx < hit.shape[1] and hit[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def task(name: str, **args):
    return build_task(
        load_config(None, [f"task.name={name}"]).task
        if not args
        else load_config(None, [f"task.name={name}", *(f"task.args.{k}={v}" for k, v in args.items())]).task
    )


@pytest.mark.parametrize("name", list(VISUAL))
def test_generator_is_a_pure_function_of_the_seed(name):
    t = task(name)
    a, b = t.heldout(12, 7), t.heldout(12, 7)
    assert [(e.prompt, e.answer, e.columns["image"]) for e in a] == [
        (e.prompt, e.answer, e.columns["image"]) for e in b
    ]
    other = t.heldout(12, 8)
    assert [e.key for e in a] != [e.key for e in other]
    src1, src2 = t.train_source(3, frozenset()), t.train_source(3, frozenset())
    assert [e.key for e in src1.next(5)] == [e.key for e in src2.next(5)]
    image = Image.open(io.BytesIO(a[0].columns["image"]))
    assert image.size == (56, 56) and image.format == "PNG"


@pytest.mark.parametrize("colours,max_count", [(1, 3), (2, 4), (3, 5)])
def test_count_answer_is_the_number_of_blobs_of_the_asked_colour(colours, max_count):
    rng = np.random.default_rng(0)
    for _ in range(40):
        ex = make_count(rng, max_count=max_count, colours=colours, size=56)
        colour = ex.prompt.split()[2]
        image = pixels(ex)
        assert blobs(image, COLOURS[colour]) == int(ex.answer)
        assert 1 <= int(ex.answer) <= max_count
        assert sum(blobs(image, COLOURS[c]) for c in COLOURS) <= colours * max_count


def test_compare_answer_is_the_colour_with_more_blobs():
    rng = np.random.default_rng(1)
    for _ in range(40):
        ex = make_compare(rng, max_count=4, colours=3, size=56)
        a, b = ex.prompt.removeprefix("More ").removesuffix("?").split(" or ")
        na, nb = blobs(pixels(ex), COLOURS[a]), blobs(pixels(ex), COLOURS[b])
        assert na != nb and ex.answer == (a if na > nb else b)


def test_bar_answer_is_the_bar_height_in_units():
    rng = np.random.default_rng(2)
    size, bars, max_value = 56, 4, 5
    unit, slot = (size - 4) // max_value, size // bars
    for _ in range(30):
        ex = make_bars(rng, bars=bars, max_value=max_value, size=size)
        k = int(ex.prompt.split()[3].rstrip("?"))
        column = (pixels(ex)[:, (k - 1) * slot + 2 + 1] == np.asarray(INK, dtype=np.uint8)).all(-1)
        assert column[: size - 1].sum() == int(ex.answer) * unit  # the baseline is the last row (size - 1)


def test_heldout_is_distinct_and_never_drawn_for_training():
    t = task("count_shapes", max_count=2, colours=1)
    held = t.heldout(30, 5)
    keys = {e.key for e in held}
    assert len(keys) == 30
    assert {e.prompt for e in held} == {"How many red shapes?"}  # one question: the key tells images apart
    drawn = t.train_source(0, frozenset(keys)).next(300)
    assert not keys & {e.key for e in drawn}


def test_exact_match_scores_the_answer_and_nothing_else():
    ex = task("add_numbers").heldout(20, 0)
    assert exact_match(None, [f" {e.answer}\n" for e in ex], [e.answer for e in ex]) == [1.0] * 20
    wrong = [str(int(e.answer) + 1) for e in ex]
    assert exact_match(None, wrong, [e.answer for e in ex]) == [0.0] * 20
    assert all(0 <= int(e.answer) <= 18 for e in ex)


def test_registry_names_and_argument_errors():
    assert set(VISUAL) <= set(task_names())
    with pytest.raises(ValueError, match="unknown argument 'colors'.*valid arguments: max_count, colours, size"):
        task("count_shapes", colors=2)
    with pytest.raises(ValueError, match=r"max_count=12 must be an integer in \[1, 9\]"):
        task("count_shapes", max_count=12)
    with pytest.raises(ValueError, match="size 60: must be a multiple of 14"):
        task("count_shapes", size=60).heldout(1, 0)


def test_text_model_with_an_image_task_is_refused_before_loading():
    from mhpo.errors import UsageError
    from mhpo.trainer.setup import prepare_run

    cfg = load_config(None, ["task.name=count_shapes", "eval.size=4"])
    with pytest.raises(UsageError, match="model 'tiny' is text-only; use model.name_or_path=tiny-vlm"):
        prepare_run(cfg)
