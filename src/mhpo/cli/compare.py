"""`mhpo compare`: objectives x seeds on one task and config, then the stability report."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mhpo.compare import BASELINES, PRESETS, parse_objectives, plan_jobs, run_jobs
from mhpo.errors import UsageError


def add_arguments(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for every run")
    parser.add_argument(
        "--objectives", help=f"comma-separated, NAME or NAME[k=v,...] (default: the preset's; {BASELINES})"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--preset", default="default", help=f"one of: {', '.join(PRESETS)} (default: %(default)s)")
    parser.add_argument("--config", metavar="FILE", help="base YAML config (the preset's overrides apply on top)")
    parser.add_argument("--steps", type=int, metavar="N", help="RL steps per run")
    parser.add_argument("--output-dir", metavar="DIR", help="default: runs/compare-<preset>")
    parser.add_argument("--jobs", type=int, default=None, help="parallel runs (default: the core count)")
    parser.add_argument(
        "--target", type=float, default=0.5, help="target accuracy for the report (default: %(default)s)"
    )


def run(args) -> int:
    from mhpo.compare.report import build_report
    from mhpo.trainer.config import ConfigError, load_config

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds} must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs} must be >= 1")
    if not 0 < args.target <= 1:
        raise UsageError(f"--target {args.target} must be in (0, 1]")
    preset = PRESETS[args.preset]
    specs = parse_objectives(args.objectives or preset.objectives)
    overrides = list(preset.overrides) + list(args.overrides or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    try:
        base = load_config(args.config, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    out = Path(args.output_dir or f"runs/compare-{args.preset}")
    n_runs = len(specs) * args.seeds
    cores = os.cpu_count() or 1
    workers = args.jobs or min(cores, n_runs)
    jobs = plan_jobs(base, specs, list(range(args.seeds)), out, threads=max(1, cores // workers))
    from mhpo.trainer.train import validate

    validate(base).scorer.close()  # task, rewards, model: checked once before any work
    setting = f"{args.preset} preset" + (f" over {args.config}" if args.config else "")
    print(
        f"mhpo compare: {len(specs)} objectives x {args.seeds} seeds = {len(jobs)} runs, {workers} in parallel, "
        f"{setting} ({preset.about}); output {out}"
    )
    t0 = time.perf_counter()
    failures = run_jobs(jobs, workers)
    if failures:
        print(
            f"{len(failures)} of {len(jobs)} runs failed; rerun the same command to retry them (finished runs are "
            "skipped)"
        )
        return 1
    result = build_report(
        [out / "runs"],
        out,
        target=args.target,
        reference=specs[0][0],
        order=[s[0] for s in specs],
        title=f"{setting}, {len(specs)} objectives x {args.seeds} seeds",
    )
    print("\n".join(result["summary"]))
    print(f"\n{len(jobs)} runs in {time.perf_counter() - t0:.0f} s; report: {out / 'report.md'}, {out / 'report.html'}")
    return 0
