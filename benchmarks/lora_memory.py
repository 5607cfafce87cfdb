"""Benchmark: peak memory and seconds per RL step of full fine-tuning, LoRA and gradient checkpointing.

    PYTHONPATH=src .venv/bin/python benchmarks/lora_memory.py --steps 3          # the four configurations
    PYTHONPATH=src .venv/bin/python benchmarks/lora_memory.py --steps 5 --rounds 2 --rank 8

The job is `mhpo train --config smollm2-short-answers`'s RL step on the real model
(SmolLM2-135M-Instruct; 8 chat_addition prompts x group 4 = 32 completions of <= 16 tokens, 2
optimizer steps per batch, the config's lr and precision), at equal batch in every configuration:

    full          full fine-tuning (AdamW over all 134.5M parameters)
    lora          model.lora.rank=--rank (alpha 2 x rank, q/k/v/o projections)
    full+gc       full fine-tuning, model.gradient_checkpointing=true
    lora+gc       LoRA and gradient checkpointing

Each configuration runs in a fresh process (one configuration's heap never serves another's), the
configurations alternate (full, lora, full+gc, lora+gc, then again for each --rounds), and each
process runs one warm-up RL step, then --steps timed ones (wall time of ``rl_step``: sample, score,
behaviour log-probs, update). Memory: ``resource.getrusage`` peak RSS of the whole process (imports,
model, optimizer state, everything), and the RL steps' own peak above the RSS after the warm-up step
(the kernel's peak mark is reset by writing "5" to /proc/self/clear_refs; "n/a" where that is not
allowed). AdamW's moments appear at the first optimizer step, so they are inside both numbers.
The table gives medians over all timed steps of all rounds.
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

from logprobs import _reset_peak, _rss_kb  # the peak-RSS helpers of benchmarks/logprobs.py (this folder)
from mhpo.models.device import machine_info

CONFIGS = {
    "full": [],
    "lora": ["model.lora.rank={rank}"],
    "full+gc": ["model.gradient_checkpointing=true"],
    "lora+gc": ["model.lora.rank={rank}", "model.gradient_checkpointing=true"],
}


def main() -> None:
    args = _parse()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in CONFIGS:
            out = _spawn(name, args)
            results[name].append(out)
            print(
                f"round {r + 1}/{args.rounds} {name:>8}: peak RSS {out['peak_mb']:.0f} MB, "
                f"steps {out['step_s']} s, trainable {out['trainable']:,}",
                flush=True,
            )
    _print_table(results, args)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed RL steps per process (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per configuration, alternating")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--config", default="smollm2-short-answers", help="the packaged config (or a YAML file)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.rank < 1:
        p.error("--steps, --rounds and --rank must be >= 1")
    return args


def _spawn(name: str, args: argparse.Namespace) -> dict:
    """Run one worker process for configuration ``name``; its JSON report."""
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--rank", str(args.rank)]
    proc = subprocess.run([*cmd, "--config", args.config], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(args: argparse.Namespace) -> dict:
    """Load the policy of configuration ``args.worker``, run 1 + --steps RL steps; seconds and memory."""
    from collections import deque

    import torch

    from mhpo.generation.policy import quiet_transformers
    from mhpo.seeding import derive_seed
    from mhpo.trainer.config import load_config
    from mhpo.trainer.setup import build_policy, model_loader, prepare_run
    from mhpo.trainer.step import rl_step

    overrides = [o.format(rank=args.rank) for o in CONFIGS[args.worker]]
    cfg = load_config(args.config, [*overrides, f"train.steps={args.steps + 1}", "train.progress=false"])
    quiet_transformers()
    with prepare_run(cfg) as plan:
        torch.set_num_threads(plan.cfg.train.threads)
        pol = build_policy(plan.cfg, model_loader(plan.cfg), plan.cfg.model.name_or_path, plan.cfg.model.name_or_path)
        keys = frozenset(ex.key for ex in plan.heldout)
        source = plan.task.train_source(derive_seed(plan.cfg.seed, "rl-data"), keys)
        torch.manual_seed(derive_seed(plan.cfg.seed, "rl"))
        pending: deque = deque()
        times = []
        can_reset = False
        for step in range(1, args.steps + 2):
            if step == 2:  # after the warm-up step: the steps' own peak from here
                can_reset, base_kb = _reset_peak(), _rss_kb()
            t0 = time.perf_counter()
            with pol.autocast():
                rl_step(plan, pol, source, pending, step)
            if step > 1:
                times.append(round(time.perf_counter() - t0, 2))
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in pol.model.parameters() if p.requires_grad)
    return {
        "peak_mb": peak_kb / 1024,
        "steps_peak_mb": max(peak_kb - base_kb, 0) / 1024 if can_reset else None,
        "step_s": times,
        "trainable": trainable,
        "threads": torch.get_num_threads(),
        "precision": plan.cfg.model.dtype,
    }


def _print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    first = results["full"][0]
    print(
        f"\nCPU: {machine_info()['cpu']} ({os.cpu_count()} cores, torch threads {first['threads']}); "
        f"config {args.config} (dtype {first['precision']}); LoRA rank {args.rank}; "
        f"{args.rounds} process(es) x {args.steps} timed steps per configuration after 1 warm-up step\n"
    )
    print("| configuration | trainable params | peak RSS (MB) | RL steps' peak above warm RSS (MB) | s / RL step |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        peak = statistics.median(r["peak_mb"] for r in runs)
        own = [r["steps_peak_mb"] for r in runs if r["steps_peak_mb"] is not None]
        own_text = f"{statistics.median(own):.0f}" if own else "n/a"
        steps = [s for r in runs for s in r["step_s"]]
        spread = f"{statistics.median(steps):.2f} ({min(steps):.2f}..{max(steps):.2f})"
        print(f"| {name} | {runs[0]['trainable']:,} | {peak:.0f} | {own_text} | {spread} |")
    print("\nmedians over processes (memory) and over all timed steps (time, min..max in brackets)")


if __name__ == "__main__":
    main()
