"""`mhpo objectives`: the registered objectives as a table (name, formula, defaults)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mhpo.objectives import OBJECTIVES


def add_arguments(parser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead")


def _defaults(obj) -> str:
    return ", ".join(f"{k}={v}" for k, v in obj.defaults.items()) or "-"


def run(args) -> int:
    rows = [(name, obj.formula, _defaults(obj)) for name, obj in OBJECTIVES.items()]
    if args.markdown:
        print("| name | objective (maximised, per token) | defaults |\n|---|---|---|")
        for row in rows:
            print("| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(row)) + " |")
        return 0
    table = Table(title="mhpo objectives (r = pi/pi_old, A = advantage, sg = stop-gradient)")
    for col in ("name", "objective (maximised, per token)", "defaults"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return 0
