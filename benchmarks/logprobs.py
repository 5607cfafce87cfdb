"""Benchmark: chunked `token_logprobs` vs the naive full-logits path, forward + backward + loss.

    .venv/bin/python benchmarks/logprobs.py                    # V = 50k, 8k tokens, H = 896, float32, CPU
    .venv/bin/python benchmarks/logprobs.py --chunk-sizes 256,512,1024,2048 --reps 3   # tune the chunk size
    .venv/bin/python benchmarks/logprobs.py --entropy          # add an entropy bonus to the loss

One step is: per-token log-probs of the sampled tokens (hidden [B, T, H] x weight [V, H]), then
``policy_loss("mhpo", ...)`` (token-mean), then ``loss.backward()`` into hidden and weight.
The issue's targets: chunked peak memory <= 1/4 of naive, chunked time <= 1.3x naive.

How memory is measured. torch's CPU allocator takes tensor memory straight from malloc (large
blocks are mmap'd and returned to the OS on free), so a step's tensors show up in the process's
resident set; tracemalloc would not see them. Each variant runs in a fresh subprocess (so one
variant's heap never serves the other's allocations). After setup (inputs built, imports done)
and a warm-up step on 8 tokens per row, the worker resets the kernel's peak-RSS mark by writing
"5" to /proc/self/clear_refs, runs one step, and reports peak RSS (ru_maxrss) minus the RSS just
before the step: the step's extra memory, including the gradients it creates (weight.grad alone
is V x H x 4 bytes = 179 MB at the defaults, in both variants). If clear_refs
cannot be written it reports that only for its first full step (setup and warm-up stay far below
that peak: the inputs are built in place).

How time is measured. Wall time of the step (perf_counter), and the process's CPU time
(process_time, all threads) as a second view that is less sensitive to other jobs taking the
cores. Every worker warms up on 8 tokens per row (thread pools, MKL), then times --steps full
steps; the table gives medians over all steps of all repetitions, and the ratios are ratios of
those medians. The variants are interleaved within each repetition so slow phases of a shared
machine hit all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_KEYS = ("mem_mb", "time_s", "cpu_s")  # per measured step: extra peak RSS, wall seconds, process CPU seconds


def main() -> None:
    args = _parse()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    variants = ["naive"] + [f"chunked:{c}" for c in args.chunk_sizes]
    results: dict[str, dict[str, list[float]]] = {v: {k: [] for k in _KEYS} for v in variants}
    for rep in range(args.reps):
        for variant in variants:
            out = _spawn(variant, args)
            for k in _KEYS:
                results[variant][k] += out[k]
            print(
                f"rep {rep + 1}/{args.reps} {variant:>14}: mem {out['mem_mb']} MB, wall {out['time_s']} s, "
                f"cpu {out['cpu_s']} s",
                flush=True,
            )
    _print_table(results, args)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--tokens", type=int, default=8192, help="B * T; rows of T = --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=896, help="hidden width (Qwen2.5-0.5B: 896)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--entropy", action="store_true", help="also compute entropy and add a bonus to the loss")
    p.add_argument("--reps", type=int, default=5, help="fresh worker processes per variant")
    p.add_argument("--steps", type=int, default=1, help="measured steps per worker (after a small warm-up)")
    p.add_argument(
        "--chunk-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated chunk sizes (default: the library's default at --vocab only)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.chunk_sizes is None:
        from mhpo.models.logprobs import default_chunk_size

        args.chunk_sizes = [default_chunk_size(args.vocab)]
    if args.tokens % args.seq_len:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len})")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def _spawn(variant: str, args: argparse.Namespace) -> dict:
    """Run one worker process for ``variant`` and return its JSON report."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--vocab",
        str(args.vocab),
        "--tokens",
        str(args.tokens),
        "--seq-len",
        str(args.seq_len),
        "--hidden",
        str(args.hidden),
        "--dtype",
        args.dtype,
        "--steps",
        str(args.steps),
        "--chunk-sizes",
        ",".join(map(str, args.chunk_sizes)),
    ]
    if args.entropy:
        cmd.append("--entropy")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(args: argparse.Namespace) -> dict:
    """Build inputs, warm up, run --steps steps of ``args.worker``; per step: extra peak MB and seconds."""
    import torch

    from mhpo import policy_loss
    from mhpo.models.logprobs import token_logprobs, token_logprobs_reference

    variant = args.worker
    if variant == "naive":
        logprob_fn = token_logprobs_reference
    else:
        chunk = int(variant.split(":")[1])

        def logprob_fn(*a, **k):
            return token_logprobs(*a, chunk_size=chunk, **k)

    dtype = getattr(torch, args.dtype)
    rows, seq = args.tokens // args.seq_len, args.seq_len
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, seq, args.hidden, generator=gen, dtype=dtype).requires_grad_()  # [B, T, H]
    weight = torch.randn(args.vocab, args.hidden, generator=gen, dtype=dtype).mul_(0.05).requires_grad_()  # [V, H]
    targets = torch.randint(0, args.vocab, (rows, seq), generator=gen)  # [B, T]
    old_logp = torch.full((rows, seq), -11.0)  # [B, T] ~ log(1/V)
    advantages = torch.randn(rows, generator=gen)  # [B]
    mask = torch.ones(rows, seq, dtype=torch.bool)  # [B, T]

    def step(cols: slice) -> None:
        """log-probs of tokens [:, cols] -> policy_loss (+ entropy bonus) -> backward."""
        logp, ent = logprob_fn(hidden[:, cols], weight, targets[:, cols], entropy=args.entropy)
        loss, _ = policy_loss("mhpo", logp, old_logp[:, cols], advantages, mask[:, cols], stats=False)
        if ent is not None:
            loss = loss - 0.01 * ent.mean()
        loss.backward()

    step(slice(0, 8))  # warm-up on 8 tokens per row: thread pools, MKL, lazy imports
    can_reset = _reset_peak()
    mem, times, cpu = [], [], []
    for i in range(args.steps):
        hidden.grad = weight.grad = None
        before_kb = _rss_kb()
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        step(slice(None))
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024
        times.append(round(elapsed, 3))
        cpu.append(round(cpu_s, 3))
        if can_reset or i == 0:  # without a reset only the first step's peak is its own
            mem.append(round(peak_mb, 1))
    return {"mem_mb": mem, "time_s": times, "cpu_s": cpu}


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, ru_maxrss) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb() -> int:
    """Current resident set size in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB


def _print_table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    base = {k: statistics.median(results["naive"][k]) for k in _KEYS}
    from mhpo.models.logprobs import default_chunk_size

    print(
        f"\nV={args.vocab} tokens={args.tokens} H={args.hidden} {args.dtype} entropy={args.entropy} "
        f"threads={_threads()} reps={args.reps} measured steps per variant={len(results['naive']['time_s'])} "
        f"library default chunk={default_chunk_size(args.vocab)}"
    )
    head = (
        f"{'variant':>14} | {'peak MB':>8} | {'wall s':>7} | {'wall min..max':>13} | {'cpu s':>7} | "
        f"{'mem ratio':>9} | {'wall ratio':>10} | {'cpu ratio':>9}"
    )
    print(head)
    print("-" * len(head))
    for variant, r in results.items():
        med = {k: statistics.median(r[k]) for k in _KEYS}
        spread = f"{min(r['time_s']):.1f}..{max(r['time_s']):.1f}"
        print(
            f"{variant:>14} | {med['mem_mb']:8.1f} | {med['time_s']:7.2f} | {spread:>13} | {med['cpu_s']:7.2f} | "
            f"{med['mem_mb'] / base['mem_mb']:9.3f} | {med['time_s'] / base['time_s']:10.3f} | "
            f"{med['cpu_s'] / base['cpu_s']:9.3f}"
        )
    print("medians over steps; ratios = variant / naive. Targets: mem ratio <= 0.25, wall ratio <= 1.3.")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
