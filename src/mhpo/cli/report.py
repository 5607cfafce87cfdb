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


def run(args) -> int:
    if not 0 < args.target <= 1:
        raise UsageError(f"--target {args.target} must be in (0, 1]")
    out = Path(args.out or args.dirs[0])
    result = build_report(args.dirs, out, target=args.target, reference=args.reference, title=args.title)
    print("\n".join(result["summary"]))
    print(f"\nwrote {out / 'report.md'}, {out / 'report.html'}, {out / 'report.json'}")
    return 0
