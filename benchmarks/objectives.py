"""Forward + backward time of every objective on the same tensors, as a ratio to `grpo`.

    .venv/bin/python benchmarks/objectives.py [--tokens 4194304] [--reps 15] [--threads N]

Rows `mhpo [impl=...]` time the plain-autograd reference and the torch.compile opt-in of MHPO
(compilation happens in the warm-up repetitions); rows `[stats=True]` time the default call, with
diagnostics (`policy_loss`'s default, what the trainer runs), for mhpo and grpo, and the last
column gives their cost over the same objective's `stats=False` row. Inputs: float32 [B, T] =
[512, 8192] (4M tokens), log r ~ N(0, 0.3), 90% of tokens masked in, per-sequence advantages,
token-mean. Each repetition times `policy_loss(..., stats=False)` plus `backward()`, every row once
per round (rounds interleave the rows); the table gives medians. The floor row times the
transcendental functions MHPO cannot avoid, alone, on the same tensor size: per token one tanh, two exp and one log1p.
Not a test: these machines are noisy, so read ratios from one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mhpo import OBJECTIVES, policy_loss


def make_inputs(tokens: int, seed: int = 0):
    T = 8192
    B = max(tokens // T, 1)
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 5
    logp = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.9
    return logp, old, adv, mask


def fwd_bwd(name: str, logp, old, adv, mask, stats: bool = False, **kw) -> float:
    """Seconds of one forward + backward (and the diagnostics with stats=True)."""
    logp.grad = None
    t0 = time.perf_counter()
    loss, _ = policy_loss(name, logp, old, adv, mask, stats=stats, **kw)
    loss.backward()
    return time.perf_counter() - t0


def floor_once(x: torch.Tensor) -> float:
    """Seconds of one tanh, two exp and one log1p over x (the transcendental floor)."""
    t0 = time.perf_counter()
    a = torch.tanh(x)
    b = torch.exp(a)
    c = torch.log1p(b)
    torch.exp(c)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4 * 1024 * 1024)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--objectives", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logp, old, adv, mask = make_inputs(args.tokens)
    names = args.objectives.split(",") if args.objectives else list(OBJECTIVES)
    if "grpo" not in names:
        names.insert(0, "grpo")
    rows = {n: (n, {}) for n in names}
    for n in ("mhpo", "grpo"):  # the default call: diagnostics on
        if n in names:
            rows[f"{n} [stats=True]"] = (n, {"stats": True})
    if "mhpo" in names:  # the fused kernel (default) against plain autograd and the compile opt-in
        rows["mhpo [impl=reference]"] = ("mhpo", {"impl": "reference"})
        if not args.no_compile:
            rows["mhpo [impl=compile]"] = ("mhpo", {"impl": "compile"})
    times: dict[str, list[float]] = {r: [] for r in rows}
    floor_times: list[float] = []
    x = logp.detach()
    for _ in range(args.reps + 2):  # rounds interleave every row, so slow phases hit all of them
        for row, (name, kw) in rows.items():
            times[row].append(fwd_bwd(name, logp, old, adv, mask, **kw))
        floor_times.append(floor_once(x))
    results = {r: statistics.median(t[2:]) for r, t in times.items()}  # first two rounds: warm-up, compile
    floor = statistics.median(floor_times[2:])
    base = results["grpo"]
    print(f"{logp.numel():,} tokens float32, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| objective | fwd+bwd ms | / grpo | / floor | stats on / off |\n|---|---:|---:|---:|---:|")
    for n, t in results.items():
        plain = n.replace(" [stats=True]", "")
        on_off = f"{t / results[plain]:.2f}" if plain != n and plain in results else ""
        print(f"| {n} | {t * 1e3:.1f} | {t / base:.2f} | {t / floor:.2f} | {on_off} |")
    print(f"| floor: tanh + 2 exp + log1p | {floor * 1e3:.1f} | {floor / base:.2f} | 1.00 | |")


if __name__ == "__main__":
    main()
