"""What every task provides: examples, a held-out set, and resumable streams of training prompts.

A task is a finite or infinite pool of :class:`Example` rows. Training draws from a
:class:`PromptSource`, whose whole state is a small JSON dict (saved in checkpoints so that a resumed
run sees exactly the prompts the uninterrupted run would have seen). The held-out set is fixed by
``eval.seed`` (identical across run seeds) and never appears in training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Example:
    """One problem. ``prompt`` is a string or a list of chat messages ({"role", "content"}).

    ``columns`` holds everything else a reward function may ask for by name (TRL's ``**columns``),
    and, for vision-language tasks, raw model inputs such as ``image``; see :mod:`mhpo.generation.rollout`.
    """

    prompt: Any
    answer: str
    columns: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity used to keep the held-out set out of training: the prompt, plus the image's
        identity when ``columns`` has one (the same question about two images is two problems)."""
        image = self.columns.get("image") if self.columns else None
        if image is None:
            return prompt_key(self.prompt)
        from mhpo.models.multimodal import image_key

        return f"{prompt_key(self.prompt)}\x1d{image_key(image)}"


def prompt_key(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\x1e".join(f"{m.get('role')}\x1f{m.get('content')}" for m in prompt)


class PromptSource(Protocol):
    """An endless, resumable stream of training examples."""

    def next(self, n: int) -> list[Example]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GeneratorSource:
    """Examples drawn from ``make(rng)`` with a numpy PCG64 stream; rows in ``exclude`` are skipped.

    State: the bit generator's state dict (JSON-able ints).
    """

    def __init__(self, make: Callable[[np.random.Generator], Example], seed: int, exclude: frozenset[str]):
        self._make = make
        self._rng = np.random.default_rng(seed)
        self._exclude = exclude

    def next(self, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            ex = self._make(self._rng)
            if ex.key not in self._exclude:
                out.append(ex)
        return out

    def state_dict(self) -> dict:
        return {"bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["bit_generator"]


class IndexSource:
    """Rows of a finite pool in epochs, each epoch a fresh permutation.

        order(epoch) = permutation(len(pool)) drawn from default_rng([seed, epoch])

    State: {epoch, pos}. ``fetch(i)`` returns row i (lazily, for generated pools).
    """

    def __init__(self, fetch: Callable[[int], Example], size: int, seed: int, exclude: frozenset[str] = frozenset()):
        if size < 1:
            raise ValueError("the training pool is empty")
        self._fetch = fetch
        self._size = size
        self._seed = seed
        self._exclude = exclude
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._size)

    def next(self, n: int) -> list[Example]:
        out: list[Example] = []
        skipped = 0
        while len(out) < n:
            if self.pos >= self._size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            ex = self._fetch(int(self._order[self.pos]))
            self.pos += 1
            if ex.key in self._exclude:
                skipped += 1
                if skipped > 2 * self._size:
                    raise ValueError("every training row is also in the held-out set")
                continue
            out.append(ex)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)


@dataclass
class Task:
    """A built task: its verifier, its answer budget, its held-out rows and its training stream.

    ``train_source(seed, exclude)`` opens a stream of training rows (skipping prompts in
    ``exclude``); ``heldout(n, seed, exclude=())`` returns n distinct rows of the held-out
    distribution (a pure function of n and seed), skipping prompts in ``exclude``.
    """

    name: str
    reward: str  # the default verifier (a rewards registry name)
    max_new_tokens: int
    train_source: Callable[[int, frozenset[str]], PromptSource]
    heldout: Callable[..., list[Example]]
    description: str = ""


def unique_examples(
    draw: Callable[[], Example], n: int, exclude: frozenset[str] = frozenset(), max_tries: int | None = None
) -> list[Example]:
    """n examples with distinct prompts from repeated ``draw()``, skipping ``exclude``."""
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    limit = max_tries if max_tries is not None else 50 * n + 1000
    while len(out) < n:
        tries += 1
        if tries > limit:
            raise ValueError(f"could not draw {n} distinct examples (got {len(out)}); the task's space is too small")
        ex = draw()
        if ex.key in seen or ex.key in exclude:
            continue
        seen.add(ex.key)
        out.append(ex)
    return out
