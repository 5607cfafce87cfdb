"""`mhpo eval`: a run's held-out set, or the paper's protocol on named / local benchmarks.

    mhpo eval runs/addition-mhpo-s0-...                    # latest checkpoint, the run's held-out set
    mhpo eval runs/... --checkpoint step_000100 eval.pass_k=16 eval.size=500

Held-out mode writes ``DIR/eval/<checkpoint>.json`` (results) and ``DIR/eval/<checkpoint>.samples.jsonl``
(greedy completions) and prints the results. Only ``eval.*`` keys may be overridden: the task, the
model and the reward functions are the run's own.

    mhpo eval --model RUN_DIR|MODEL_DIR|HUB_ID|FILE.gguf --benchmarks math500,aime24 --samples 32 --output-dir OUT

Benchmark mode (:mod:`mhpo.evaluation`): K samples per problem, Avg@K, unbiased pass@k, maj@K, the
macro average; OUT/samples.jsonl, OUT/summary.json, OUT/summary.md; a rerun resumes. See
docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

from mhpo.errors import UsageError


def add_arguments(parser) -> None:
    parser.add_argument(
        "run_dir", metavar="DIR", nargs="?", help="a run directory (or one of its checkpoint directories)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="eval.KEY=VALUE", help="evaluation overrides, e.g. eval.pass_k=16"
    )
    parser.add_argument(
        "--checkpoint", metavar="NAME", help="checkpoint name (step_000250) or path; default: the latest"
    )
    from mhpo.evaluation.protocol import Settings

    d = Settings()
    b = parser.add_argument_group("benchmark mode (--benchmarks; docs/evaluation.md)")
    b.add_argument(
        "--model", metavar="M", help="RUN_DIR | MODEL_DIR | HUB_ID | FILE.gguf | a named model (default: DIR)"
    )
    b.add_argument(
        "--benchmarks",
        metavar="NAMES",
        help="comma-separated: math500, aime24, aime25, amc23, hmmt25, gsm8k, "
        "geometry3k, mathvista, or local .jsonl / .parquet files / saved dataset dirs",
    )
    b.add_argument(
        "--samples", "-k", type=int, default=d.samples, metavar="K", help="samples per problem (default: %(default)s)"
    )
    b.add_argument(
        "--output-dir", "-o", metavar="OUT", help="default: DIR/eval/benchmarks for a run dir, else eval-<model>"
    )
    b.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    b.add_argument("--top-p", type=float, default=d.top_p, help="(default: %(default)s)")
    b.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)")
    b.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    b.add_argument("--system-prompt", default=None, help="system message for chat models (default: none)")
    b.add_argument(
        "--prompt-template",
        default=d.template,
        metavar="TEXT",
        help="user turn, {problem} is replaced (default: %(default)r)",
    )
    b.add_argument(
        "--answer-extraction",
        choices=("boxed", "math-verify"),
        default=d.answer_extraction,
        help="boxed: the last \\boxed{}; math-verify: also the last expression/number (default: %(default)s)",
    )
    b.add_argument(
        "--greedy", action="store_true", help="also report greedy accuracy (one more completion per problem)"
    )
    b.add_argument("--pass-k", metavar="K1,K2", help="pass@k to report (default: 1, 2, 4, ... and K)")
    b.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="completions per generate call (default: %(default)s)"
    )
    b.add_argument("--limit", type=int, help="first N problems of each benchmark")
    b.add_argument(
        "--data-dir",
        metavar="DIR",
        help="local copies of named benchmarks: DIR/<name>[.jsonl|.parquet] "
        "(a save_to_disk dir or a file in the hub schema)",
    )
    b.add_argument("--split", help="split to read (default: the benchmark's)")
    for col in ("problem", "answer", "id", "image", "choices"):
        b.add_argument(f"--{col}-column", metavar="COL", help=f"column holding the {col} (default: the benchmark's)")
    b.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16", "bf16-mixed"),
        default="auto",
        help="as model.dtype; auto: bf16 on a GPU with it, bf16-mixed on a CPU with native bf16 (default: %(default)s)",
    )
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: %(default)s)")
    b.add_argument("--chat-template", choices=("auto", "on", "off"), help="default: the run's, else auto")
    b.add_argument("--trust-remote-code", action="store_true")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the usable cores, at most 8)")
    b.add_argument(
        "--score-timeout", type=float, default=10.0, help="hard limit per scored completion, s (default: %(default)s)"
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.benchmarks is not None or args.model is not None:
        return run_benchmarks(args)
    if args.run_dir is None:
        raise UsageError("give a run directory (held-out evaluation) or --benchmarks NAMES [--model M]")
    from mhpo.trainer.evaluate_run import evaluate_run

    results = evaluate_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
    print(f"mhpo eval: {results['checkpoint']} (step {results['step']}) on {results['heldout_size']} held-out problems")
    for key, value in results["results"].items():
        print(f"  {key:<18} {value:.4f}" if isinstance(value, float) else f"  {key:<18} {value}")
    print(f"  written to {results['path']}")
    return 0


def run_benchmarks(args) -> int:
    """Benchmark mode: parse the flags into Settings, evaluate, print the table."""
    import sys

    import torch

    from mhpo.evaluation.protocol import Settings
    from mhpo.evaluation.specs import benchmark_names, split_names
    from mhpo.models.device import usable_cores
    from mhpo.trainer.evaluate_run import evaluate_benchmarks

    model = args.model or args.run_dir
    if model is None:
        raise UsageError("--benchmarks needs --model M (or a run directory DIR)")
    if args.model is not None and args.run_dir is not None:
        raise UsageError(f"give the model once: --model {args.model!r} or DIR {args.run_dir!r}")
    if args.overrides:
        raise UsageError(
            "eval.KEY=VALUE overrides apply to a run's held-out evaluation, not to --benchmarks "
            f"({args.overrides[0]!r})"
        )
    names = split_names(args.benchmarks or "")
    if not names:
        raise UsageError("--benchmarks is empty; named benchmarks: " + ", ".join(benchmark_names()))
    try:
        pass_k = tuple(int(k) for k in split_names(args.pass_k)) if args.pass_k else ()
    except ValueError:
        raise UsageError(f"--pass-k {args.pass_k!r} must be comma-separated integers") from None
    columns = {f"{c}_column": getattr(args, f"{c}_column") for c in ("problem", "answer", "id", "image", "choices")}
    try:
        settings = Settings(
            samples=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            system_prompt=args.system_prompt,
            template=args.prompt_template,
            answer_extraction=args.answer_extraction,
            greedy=args.greedy,
            batch_size=args.batch_size,
            pass_k=pass_k,
        )
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        out = args.output_dir or _default_output_dir(model)
        threads = args.threads or min(8, usable_cores())
        torch.set_num_threads(threads)
        evaluate_benchmarks(
            model,
            names,
            settings,
            out,
            data_dir=args.data_dir,
            limit=args.limit,
            columns=columns,
            split=args.split,
            dtype=args.dtype,
            device=args.device,
            chat_template=args.chat_template,
            trust_remote_code=args.trust_remote_code,
            checkpoint=args.checkpoint,
            score_timeout_s=args.score_timeout,
            progress=not args.no_progress and sys.stderr.isatty(),
            log=print,
        )
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    print((Path(out) / "summary.md").read_text(), end="")
    print(f"written to {out}/ (samples.jsonl, summary.json, summary.md)")
    return 0


def _default_output_dir(model: str) -> str:
    """DIR/eval/benchmarks for a run directory, else eval-<last path part of the model>."""
    from mhpo.trainer.run_dir import CHECKPOINTS

    p = Path(model).expanduser()
    if p.is_dir() and (p / CHECKPOINTS).is_dir():
        return str(p / "eval" / "benchmarks")
    name = p.name or str(model)
    return "eval-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
