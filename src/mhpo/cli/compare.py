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
    parser.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="objectives x seeds x these values of one config key (e.g. rollout.staleness=0,2,4,8): a report per "
        "value in <output-dir>/KEY=V/ and the stability envelope (envelope.md/html/json/png) in <output-dir>",
    )


def run(args) -> int:
    from mhpo.compare.envelope import build_envelope, parse_sweep, value_dir
    from mhpo.compare.report import build_report
    from mhpo.trainer.config import ConfigError, load_config, with_overrides

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
    key, values = parse_sweep(args.sweep) if args.sweep else (None, [None])
    n_runs = len(specs) * args.seeds * len(values)
    cores = os.cpu_count() or 1
    workers = args.jobs or min(cores, n_runs)
    seeds, threads = list(range(args.seeds)), max(1, cores // workers)
    from mhpo.trainer.setup import prepare_run

    jobs = []
    for value in values:  # value-major: each value's runs finish together
        try:
            cfg = with_overrides(base, [f"{key}={value}"]) if key else base
        except ConfigError as err:
            raise UsageError(f"--sweep {key}={value}: {err}") from None
        prepare_run(cfg).close()  # task, rewards, model: checked once before any work
        jobs += plan_jobs(cfg, specs, seeds, out, threads, runs=out / "runs" / value_dir(key, value) if key else None)
    setting = f"{args.preset} preset" + (f" over {args.config}" if args.config else "")
    swept = f" x {len(values)} values of {key}" if key else ""
    print(
        f"mhpo compare: {len(specs)} objectives x {args.seeds} seeds{swept} = {len(jobs)} runs, {workers} in "
        f"parallel, {setting} ({preset.about}); output {out}"
    )
    t0 = time.perf_counter()
    failures = run_jobs(jobs, workers)
    if failures:
        print(
            f"{len(failures)} of {len(jobs)} runs failed; rerun the same command to retry them (finished runs are "
            "skipped)"
        )
        return 1
    order, title = [s[0] for s in specs], f"{setting}, {len(specs)} objectives x {args.seeds} seeds"
    common = dict(target=args.target, reference=order[0], order=order)
    elapsed = f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s"
    if key is None:
        result = build_report([out / "runs"], out, title=title, **common)
        print("\n".join(result["summary"]))
        print(f"\n{elapsed}; report: {out / 'report.md'}, {out / 'report.html'}")
        return 0
    for value in values:
        sub = value_dir(key, value)
        build_report([out / "runs" / sub], out / sub, title=f"{title}, {sub}", **common)
    result = build_envelope(out / "runs", out, key, values, title=f"{title}: envelope over {key}", **common)
    print("\n".join(result["spread"]))
    print(f"\n{elapsed}; envelope: {out / 'envelope.md'}, {out / 'envelope.html'}; per value: {out}/{key}=*/report.md")
    return 0
