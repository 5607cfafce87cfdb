"""Benchmark: where a decode step's time goes, against the matrix products alone and the floor.

    .venv/bin/python benchmarks/decode_products.py                      # SmolLM2-135M, 3 batches
    .venv/bin/python benchmarks/decode_products.py --batches 5 --reps 5

The job is `trainer_vs_trl.py --model smollm2-135m-instruct`'s sampling stage (8 chat_addition
prompts x group 4, <= 64 new tokens, temperature 1, float32, all cores up to 8), sampled by the
trainer's own ``sample_completions`` from the untrained weights. A hook on the model records each
forward of the decode loop (and the prefill's one-token forward of the last prompt token): its rows
(the batch shrinks as rows finish and leave) and wall time.
Then, for every row count seen, the decode's matrix products alone are replayed: every Linear of
the model in its module order, with the packing the decode loop uses (:mod:`mhpo.models.packed`),
on an input of that many rows, back to back and nothing else (the weights come from memory as in
a decode step: 0.5 GB of them do not fit a cache). Printed per row count:

    step ms       median wall time of a decode forward at that row count (attention, norms,
                  rotary embeddings, activations, the cache and Python included)
    products ms   median time of the products alone at that row count
    floor ms      2 W n / F: the FLOPs of n rows at the machine's best product rate F (a 32 x 576
                  x 1536 packed product repeated on one weight, which stays in cache), as
                  `trainer_vs_trl.py`'s sampling floor counts them (W: matmul parameters)

and the sums over the batch's steps. products / floor is what this kernel on this model's weights
gives at these row counts; step / products is what the rest of a step costs on top. A sampling
stage within 1.5x its floor needs products + the rest <= 1.5 x floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3, help="sampled batches recorded (after one warm batch)")
    ap.add_argument("--reps", type=int, default=5, help="replays of the products at each row count")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import trainer_vs_trl as bench
    from mhpo.seeding import derive_seed
    from mhpo.trainer.step import sample_completions

    setup = argparse.Namespace(model="smollm2-135m-instruct", warm=0, batches=1, precision="float32", objective="mhpo")
    rates = bench.machine_rates("float32", bench.JOBS[setup.model][4] or bench._cores())
    cfg, plan, pol = bench._setup(setup, "mhpo")
    model = pol.model
    source = plan.task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset())
    torch.manual_seed(derive_seed(cfg.seed, "rl"))

    steps: list[tuple[int, float]] = []  # (rows, seconds) of each decode-step forward
    start: list[float] = []

    def before(module, args, kwargs):
        start.append(time.perf_counter())

    def after(module, args, kwargs, out):
        ids = kwargs.get("input_ids")
        # one new position per row: the decode steps, and the prefill's last prompt token on top of the
        # prompts' shared part (which runs through the decoder alone, not this hooked model)
        if ids is not None and ids.shape[1] == 1:
            steps.append((ids.shape[0], time.perf_counter() - start[-1]))

    sample_completions(plan, pol, source.next(cfg.rollout.prompts_per_step))  # warm
    hooks = [model.register_forward_pre_hook(before, with_kwargs=True)]
    hooks.append(model.register_forward_hook(after, with_kwargs=True))
    lengths, batch_s = [], []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        roll = sample_completions(plan, pol, source.next(cfg.rollout.prompts_per_step))
        batch_s.append(time.perf_counter() - t0)
        lengths.append(float(roll.lengths.float().mean()))
    for h in hooks:
        h.remove()

    products = replay_products(model, sorted({n for n, _ in steps}), rows_packed=len(roll), reps=args.reps)
    W = bench._matmul_params(model)
    per_row = 2 * W / (rates["decode_gflops"] * 1e9)  # floor seconds per row of a decode step

    by_rows: dict[int, list[float]] = defaultdict(list)
    for n, s in steps:
        by_rows[n].append(s)
    print(f"machine ({bench._cpu()}): best product rate {rates['decode_gflops']:.0f} GFLOP/s at the decode shape")
    print(
        f"{args.batches} batches of {len(roll)} rows: {statistics.median(batch_s):.2f} s a batch (median), "
        f"{statistics.mean(lengths):.1f} tokens a completion, {len(steps)} decode steps\n"
    )
    head = ("rows", 5), ("steps", 7), ("step ms", 9), ("products ms", 13), ("floor ms", 10), ("products/floor", 16)
    print("".join(f"{name:>{width}}" for name, width in head) + f"{'step/products':>15}")
    total = {"step": 0.0, "products": 0.0, "floor": 0.0}
    for n in sorted(by_rows, reverse=True):
        step, prod, floor = statistics.median(by_rows[n]), products[n], n * per_row
        k = len(by_rows[n])
        total["step"] += step * k
        total["products"] += prod * k
        total["floor"] += floor * k
        ms = f"{step * 1e3:>9.1f}{prod * 1e3:>13.1f}{floor * 1e3:>10.1f}"
        print(f"{n:>5}{k:>7}{ms}{prod / floor:>16.2f}{step / prod:>15.2f}")
    s, p, f = total["step"], total["products"], total["floor"]
    print(f"{'all':>5}{len(steps):>7}{s:>8.2f}s{p:>12.2f}s{f:>9.2f}s{p / f:>16.2f}{s / p:>15.2f}")
    print(
        f"\ndecode steps {s / f:.2f}x their floor: the products alone {p / f:.2f}x, "
        f"everything else in a step {(s - p) / f:.2f}x"
    )


def replay_products(model, row_counts: list[int], rows_packed: int, reps: int) -> dict[int, float]:
    """Median seconds of one pass of every Linear of ``model`` (module order, packed as the decode
    loop packs them) on an input of n rows, for each n in ``row_counts``."""
    import torch

    from mhpo.models.packed import packed_linears

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = {}
    with torch.no_grad(), packed_linears(model, rows=rows_packed):
        for n in row_counts:
            inputs = [torch.randn(n, m.in_features) for m in linears]

            def one_pass(inputs=inputs):
                for m, x in zip(linears, inputs):
                    m(x)

            one_pass()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                one_pass()
                times.append(time.perf_counter() - t0)
            out[n] = statistics.median(times)
    return out


if __name__ == "__main__":
    main()
