"""Benchmark: `mhpo eval`'s sampler against transformers' plain `generate(num_return_sequences=K)`.

    .venv/bin/python benchmarks/eval_vs_generate.py                      # smollm2-135m-instruct, 8 problems x K=8
    .venv/bin/python benchmarks/eval_vs_generate.py --model DIR --samples 16 --max-new-tokens 128 --rounds 5

The job: the same model (loaded once, as ``mhpo eval`` loads it: ``mhpo.generation.policy.load_weights``;
the generate engines switch its attention back to transformers' ``sdpa`` where mhpo runs CPU bf16
attention in float32), the same problems rendered
by the same prompt encoder (chat template + the boxed-answer instruction), K completions each,
temperature 0.6, top-p 0.95, top-k off, the same ``max_new_tokens``, EOS ids and torch threads.
Engines:

    mhpo               what ``mhpo eval`` runs: :func:`mhpo.generation.rollout.sample` with ``group_size=K``
                       on batches of ``batch_size // K`` problems (each prompt prefilled once, its
                       KV cache repeated K times)
    generate           the plain loop: per problem, ``model.generate(prompt,
                       num_return_sequences=K)`` (the prompt prefilled K times)
    generate-batched   ``model.generate`` on the same padded multi-problem batches as mhpo, with
                       ``num_return_sequences=K`` (batching without prefix sharing)

Measured: completion tokens (up to and including each row's first EOS) per second of generation
wall time. Each round runs every engine once on all problems, in alternating order (a busy shared
machine slows all of them); a first untimed round warms up. The table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

PROBLEMS = [
    "A farmer has {a} cows and buys {b} more. Then {c} cows are sold. How many cows does the farmer have now?",
    "What is {a} times {b}, plus {c}?",
    "Tom reads {a} pages a day for {b} days, then {c} more pages. How many pages did he read in total?",
    "Solve for x: x + {a} = {b} + {c}.",
    "A box holds {a} red balls and {b} blue balls. {c} red balls are removed. How many balls are left?",
    "Compute ({a} + {b}) * {c}.",
    "A train travels {a} km per hour for {b} hours and then {c} km more. How far does it travel?",
    "What is the remainder when {a}{b} is divided by {c}?",
]


def problems(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        a, b, c = (int(v) for v in torch.randint(2, 60, (3,), generator=g))
        out.append(PROBLEMS[i % len(PROBLEMS)].format(a=a, b=b, c=c))
    return out


def _tokens(tokens: torch.Tensor, eos_ids) -> int:
    from mhpo.generation.rollout import completion_mask

    return int(completion_mask(tokens, eos_ids).sum())


def run_mhpo(ctx, seed: int) -> int:
    from mhpo.generation.rollout import sample

    total = 0
    for chunk in ctx["batches"]:
        torch.manual_seed(seed)
        roll = sample(
            ctx["model"],
            ctx["tok"],
            chunk,
            group_size=ctx["K"],
            max_new_tokens=ctx["max_new"],
            eos_ids=ctx["eos"],
            do_sample=True,
            temperature=ctx["T"],
            top_p=ctx["top_p"],
            top_k=0,
            batch_size=ctx["batch_size"],
        )
        total += int(roll.lengths.sum())
    return total


def run_generate(ctx, seed: int) -> int:
    total = 0
    for single in ctx["singles"]:
        torch.manual_seed(seed)
        out = ctx["model"].generate(**single, generation_config=ctx["gen_cfg_k"])
        total += _tokens(out[:, single["input_ids"].shape[1] :], ctx["eos"])
    return total


def run_generate_batched(ctx, seed: int) -> int:
    total = 0
    for chunk in ctx["batches"]:
        torch.manual_seed(seed)
        out = ctx["model"].generate(**chunk, generation_config=ctx["gen_cfg_k"])
        total += _tokens(out[:, chunk["input_ids"].shape[1] :], ctx["eos"])
    return total


ENGINES = {"mhpo": run_mhpo, "generate": run_generate, "generate-batched": run_generate_batched}


def setup(args) -> dict:
    from mhpo.evaluation.loading import DEFAULT_TEMPLATE, apply_template
    from mhpo.generation import sampling_config
    from mhpo.generation.policy import load_weights
    from mhpo.generation.prompts import build_encoder, eos_token_ids
    from mhpo.models.device import resolve_device, resolve_precision
    from mhpo.tasks.base import Example

    device = resolve_device(args.device)
    precision = resolve_precision(args.dtype, device)
    model, tok = load_weights(args.model, precision=precision, device=device)  # as `mhpo eval` loads it
    model.eval()
    enc = build_encoder(tok, chat_template="auto")
    examples = [Example(apply_template(DEFAULT_TEMPLATE, p), "") for p in problems(args.problems)]
    per = max(1, args.batch_size // args.samples)
    batches = [enc(examples[s : s + per]) for s in range(0, len(examples), per)]
    singles = [enc([ex]) for ex in examples]
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    gen_cfg = sampling_config(
        model,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        eos_ids=eos,
        pad_id=pad,
    )
    gen_cfg_k = copy.deepcopy(gen_cfg)
    gen_cfg_k.num_return_sequences = args.samples  # the plain engines' only difference: K copies of each prompt
    prompt_lens = [int(s["attention_mask"].sum()) for s in singles]
    return dict(
        model=model,
        tok=tok,
        batches=batches,
        singles=singles,
        eos=eos,
        gen_cfg_k=gen_cfg_k,
        K=args.samples,
        max_new=args.max_new_tokens,
        T=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        precision=precision,
        device=device,
        prompt_lens=prompt_lens,
    )


def _attention(ctx, engine: str) -> None:
    """mhpo's attention for mhpo's engine (what load_weights chose), transformers' sdpa for generate's."""
    model = ctx["model"]
    if "attn" not in ctx:
        ctx["attn"] = model.config._attn_implementation
    want = ctx["attn"] if engine == "mhpo" else "sdpa"
    if model.config._attn_implementation != want:
        model.set_attn_implementation(want)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="K completions per problem")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=64, help="completions per generate call (mhpo, generate-batched)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--engines", default=",".join(ENGINES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = setup(args)
    engines = args.engines.split(",")
    print(
        f"model {args.model} ({ctx['precision'].name}, {ctx['device']}), {args.problems} problems "
        f"(prompt tokens {min(ctx['prompt_lens'])}-{max(ctx['prompt_lens'])}), K={args.samples}, "
        f"max_new_tokens {args.max_new_tokens}, T {args.temperature}, top-p {args.top_p}, "
        f"{args.batch_size} completions per batch, {args.threads} thread(s)",
        flush=True,
    )
    speed: dict[str, list[float]] = {e: [] for e in engines}
    secs: dict[str, list[float]] = {e: [] for e in engines}
    with torch.no_grad(), ctx["precision"].context(ctx["device"]):
        for rnd in range(args.rounds + 1):
            order = engines if rnd % 2 == 0 else engines[::-1]
            for e in order:
                _attention(ctx, e)
                t0 = time.perf_counter()
                n = ENGINES[e](ctx, seed=rnd)
                dt = time.perf_counter() - t0
                label = "warm-up" if rnd == 0 else f"round {rnd}/{args.rounds}"
                print(f"{label:>12} {e:>16}: {n} tokens in {dt:.1f} s = {n / dt:.1f} tok/s", flush=True)
                if rnd > 0:
                    speed[e].append(n / dt)
                    secs[e].append(dt)
    base = statistics.median(speed["generate"]) if "generate" in speed else None
    print("\n| engine | completion tokens/s (median) | seconds per round (median) | vs plain generate |")
    print("|---|---|---|---|")
    for e in engines:
        med = statistics.median(speed[e])
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {e} | {med:.1f} | {statistics.median(secs[e]):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
