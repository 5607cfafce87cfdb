"""Procedural tasks: infinite streams of small exactly-checkable problems, made with numpy.

    addition  (digits=d)   '042+317=' -> '0359'       fixed-width, zero-padded operands and sum
              (mixed_widths, default true: training operands get a random number of digits 1..d
              first; the held-out set is always full width)
    reverse   (length=n)   'hello|'   -> 'olleh'      reverse a lowercase string
    sort      (length=n)   '3141|'    -> '1134'       sort a string of digits
    chat_addition (digits=d)  'What is 4 + 7? Put the final answer in \\boxed{}.' -> '11'
              for pretrained chat models: no padding, math-verify instead of exact match

Each entry is a pure ``make(rng, **args) -> Example`` plus its argument schema and its verifier
(exact match on the stripped completion unless it names another). ``heldout`` fixes arguments for
the held-out set (addition's held-out problems are always full-width uniform, whatever the
training mix).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from mhpo.tasks.base import Example, GeneratorSource, Task, unique_examples


@dataclass(frozen=True)
class Arg:
    default: int | bool
    lo: int
    hi: int
    help: str


@dataclass(frozen=True)
class Procedural:
    make: Callable[..., Example]  # make(rng, **args) -> Example
    args: Mapping[str, Arg]
    max_new_tokens: Callable[..., int]  # answer length + 1 for EOS (called with all args)
    description: str
    heldout: Mapping[str, object] = field(default_factory=dict)  # args fixed for the held-out set
    reward: str = "exact_match"  # the verifier ('auto' in rewards.functions)


def make_addition(rng: np.random.Generator, *, digits: int, mixed_widths: bool = False) -> Example:
    """a + b, zero-padded to d digits; the answer is the (d+1)-digit sum.

    a, b ~ U[0, 10^d); with ``mixed_widths`` each operand first draws its width w ~ U{1..d} and then
    its value ~ U[0, 10^w) (same format, more easy problems: a curriculum that makes the supervised
    warm-up cross its threshold in 200-300 steps on 6 of 6 seeds instead of 250-1000+).
    """
    if mixed_widths:
        wa, wb = (int(w) for w in rng.integers(1, digits + 1, size=2))
        a, b = int(rng.integers(0, 10**wa)), int(rng.integers(0, 10**wb))
    else:
        a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
    return Example(f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}")


def make_chat_addition(rng: np.random.Generator, *, digits: int, boxed: bool = True) -> Example:
    """'What is a + b?' for a chat model, a, b ~ U[0, 10^d); the answer is the sum, checked by
    last_number (the final number of a free-form reply, or its \\boxed{} content). ``boxed`` adds
    the instruction 'Put the final answer in \\boxed{}.'"""
    a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
    suffix = " Put the final answer in \\boxed{}." if boxed else ""
    return Example(f"What is {a} + {b}?{suffix}", str(a + b))


def make_reverse(rng: np.random.Generator, *, length: int) -> Example:
    """A random lowercase string s of the given length: prompt 's|', answer reversed(s)."""
    s = "".join(rng.choice(list(string.ascii_lowercase), size=length))
    return Example(f"{s}|", s[::-1])


def make_sort(rng: np.random.Generator, *, length: int) -> Example:
    """A random digit string s: prompt 's|', answer the digits in ascending order."""
    s = "".join(str(int(d)) for d in rng.integers(0, 10, size=length))
    return Example(f"{s}|", "".join(sorted(s)))


PROCEDURAL: dict[str, Procedural] = {
    "addition": Procedural(
        make_addition,
        {
            "digits": Arg(3, 1, 9, "operand width"),
            "mixed_widths": Arg(True, 0, 1, "training operands of random width 1..digits (held-out: full width)"),
        },
        lambda digits, **_: digits + 2,
        "fixed-width zero-padded addition, e.g. 042+317= -> 0359",
        heldout={"mixed_widths": False},
    ),
    "chat_addition": Procedural(
        make_chat_addition,
        {
            "digits": Arg(1, 1, 9, "operand width (no zero padding)"),
            "boxed": Arg(True, 0, 1, "ask for the final answer in \\boxed{}"),
        },
        lambda digits, **_: 32,
        "natural-language addition for chat models, e.g. What is 4 + 7? -> 11 (the last number in the reply)",
        reward="last_number",  # math_verify would score the restated question "4 + 7" as 11
    ),
    "reverse": Procedural(
        make_reverse,
        {"length": Arg(5, 1, 64, "string length")},
        lambda length, **_: length + 1,
        "reverse a lowercase string",
    ),
    "sort": Procedural(
        make_sort, {"length": Arg(5, 1, 64, "string length")}, lambda length, **_: length + 1, "sort a string of digits"
    ),
}


def resolve_args(name: str, spec: Procedural, args: Mapping) -> dict[str, int]:
    """Defaults updated by ``args``; ValueError naming a bad key or value and the valid ones."""
    out = {k: a.default for k, a in spec.args.items()}
    for key, value in args.items():
        if key not in spec.args:
            raise ValueError(f"task {name!r}: unknown argument {key!r}; valid arguments: {', '.join(spec.args)}")
        a = spec.args[key]
        if isinstance(a.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"task {name!r}: argument {key}={value!r} must be true or false")
        elif isinstance(value, bool) or not isinstance(value, int) or not a.lo <= value <= a.hi:
            raise ValueError(f"task {name!r}: argument {key}={value!r} must be an integer in [{a.lo}, {a.hi}]")
        out[key] = value
    return out


def build_procedural(name: str, args: Mapping) -> Task:
    spec = PROCEDURAL[name]
    kw = resolve_args(name, spec, args)
    make = partial(spec.make, **kw)
    make_heldout = partial(spec.make, **{**kw, **spec.heldout})

    def heldout(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Example]:
        rng = np.random.default_rng(seed)
        return unique_examples(lambda: make_heldout(rng), n, exclude)

    def train_source(seed: int, exclude: frozenset[str]) -> GeneratorSource:
        return GeneratorSource(make, seed, exclude)

    return Task(name, spec.reward, spec.max_new_tokens(**kw), train_source, heldout, spec.description)
