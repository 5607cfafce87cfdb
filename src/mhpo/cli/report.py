"""`mhpo report`: re-render a comparison report from finished runs (:mod:`mhpo.compare.report`)."""

from __future__ import annotations

from pathlib import Path

from mhpo.compare.report import build_report
from mhpo.errors import UsageError


def add_arguments(parser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a comparison directory, or run directories")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: the first DIR)")
    parser.add_argument("--target", type=float, default=0.5, help="target held-out accuracy (default: %(default)s)")
    parser.add_argument(
        "--reference", help="objective label the others are compared with (default: mhpo, else the first)"
    )
    parser.add_argument("--title", help="the report's title (default: the task, objectives x seeds)")
    parser.add_argument(
        "--sweep",
        metavar="KEY",
        help="DIR is a `mhpo compare --sweep KEY=...` output: render the envelope (and a report per value) from its "
        "finished runs, also while the sweep is still running",
    )


def run(args) -> int:
    if not 0 < args.target <= 1:
        raise UsageError(f"--target {args.target} must be in (0, 1]")
    out = Path(args.out or args.dirs[0])
    if args.sweep:
        return _sweep(args, out)
    result = build_report(args.dirs, out, target=args.target, reference=args.reference, title=args.title)
    print("\n".join(result["summary"]))
    print(f"\nwrote {out / 'report.md'}, {out / 'report.html'}, {out / 'report.json'}")
    return 0


def _sweep(args, out: Path) -> int:
    from mhpo.compare.envelope import build_envelope, value_dir

    if len(args.dirs) != 1:
        raise UsageError("--sweep takes one DIR: the output directory of mhpo compare --sweep")
    runs = Path(args.dirs[0]) / "runs"
    prefix = value_dir(args.sweep, "")
    found = {d.name[len(prefix) :] for d in runs.glob(f"{prefix}*") if d.is_dir()}
    recorded = {d.parent.name[len(prefix) :] for d in out.glob(f"{prefix}*/report.json")}
    values = sorted(found | recorded, key=_number_first)
    if not values:
        raise UsageError(f"no {prefix}<value> folders under {runs} (nor reports of them under {out})")
    common = dict(target=args.target, reference=args.reference)
    for value in sorted(found, key=_number_first):  # a value known only from its report keeps that report
        try:
            build_report([runs / value_dir(args.sweep, value)], out / value_dir(args.sweep, value), **common)
        except UsageError:  # no finished run of this value yet
            continue
    result = build_envelope(runs, out, args.sweep, values, title=args.title, **common)
    print("\n".join(result["spread"]))
    print(f"\nwrote {out / 'envelope.md'}, {out / 'envelope.html'}, {out / 'envelope.json'}, {out / 'envelope.png'}")
    return 0


def _number_first(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)
