"""reasoning-gym datasets by name (``task.name: rg:<dataset>``), generated offline.

Rows are generated lazily by index (``dataset[i]`` is a pure function of (seed, i)); some
generators write files, so every generation call runs inside a private temporary working directory.
The verifier is the dataset's own ``score_answer`` (reward ``reasoning_gym``), which receives the
whole row as the ``entry`` column.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from functools import lru_cache

from mhpo.tasks.base import Example, IndexSource, Task, unique_examples

PREFIX = "rg:"
DEFAULT_MAX_NEW_TOKENS = 256


@lru_cache(maxsize=1)
def scratch_dir() -> str:
    """A private temporary working directory for generators that write files (removed at exit)."""
    path = tempfile.mkdtemp(prefix="mhpo-rg-")
    atexit.register(shutil.rmtree, path, True)
    return path


def in_scratch():
    return contextlib.chdir(scratch_dir())


def check_args(name: str, args: Mapping) -> None:
    """ValueError when ``name`` is not a reasoning-gym dataset or ``args`` are not its config fields."""
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        from mhpo.errors import did_you_mean

        raise ValueError(
            f"unknown reasoning-gym dataset {name!r}{did_you_mean(name, DATASETS)}; "
            f"valid datasets: {', '.join(sorted(DATASETS))}"
        )
    _, config_cls = DATASETS[name]
    fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    for key in args:
        if key not in fields:
            raise ValueError(f"task 'rg:{name}': unknown argument {key!r}; valid arguments: {', '.join(fields)}")


def create(name: str, size: int, seed: int, args: Mapping):
    import reasoning_gym

    with in_scratch():
        try:
            return reasoning_gym.create_dataset(name, size=size, seed=seed, **dict(args))
        except (AssertionError, TypeError, ValueError) as err:  # the dataset's own config.validate()
            raise ValueError(f"task 'rg:{name}': invalid arguments {dict(args)!r}: {err}") from None


def to_example(entry: dict) -> Example:
    return Example(entry["question"], str(entry["answer"]), {"entry": entry})


def build_reasoning_gym(name: str, args: Mapping, train_size: int) -> Task:
    with in_scratch():
        import reasoning_gym  # noqa: F401  (registers the datasets)
    check_args(name, args)
    create(name, 1, 0, args)  # validates the arguments now, before any model is loaded

    def heldout(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
        ds = create(name, 4 * n + 100, seed, args)
        it = iter(range(4 * n + 100))

        def draw() -> Example:
            with in_scratch():
                return to_example(ds[next(it)])

        try:
            return unique_examples(draw, n, exclude, max_tries=4 * n + 100)
        except (StopIteration, RuntimeError):
            raise ValueError(f"task 'rg:{name}': could not draw {n} distinct held-out problems") from None

    def train_source(seed: int, exclude: frozenset[str]) -> IndexSource:
        ds = create(name, train_size, seed, args)

        def fetch(i: int) -> Example:
            with in_scratch():
                return to_example(ds[i])

        return IndexSource(fetch, train_size, seed, exclude)

    return Task(PREFIX + name, "reasoning_gym", DEFAULT_MAX_NEW_TOKENS, train_source, heldout, f"reasoning-gym {name}")
