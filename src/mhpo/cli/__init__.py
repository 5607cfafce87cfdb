"""The `mhpo` command line. Each subcommand lives in its own module and is imported only when used
(so `mhpo objectives` does not pay for importing transformers).

A module named here provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mhpo.errors import Interrupted, UsageError  # re-exported: mhpo.cli.UsageError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mhpo.cli.train", "RL with verifiable rewards on a causal LM (default: offline tiny demo)"),
    "eval": ("mhpo.cli.eval", "evaluate a run on its held-out set, or any model on math benchmarks (--benchmarks)"),
    "compare": ("mhpo.cli.compare", "run objectives x seeds on one task and write a stability report"),
    "report": ("mhpo.cli.report", "re-render a comparison report from finished runs"),
    "objectives": ("mhpo.cli.objectives", "list the registered objectives: formula and defaults"),
    "plot-multipliers": ("mhpo.cli.plot_multipliers", "plot the gradient multiplier M(r) of every objective"),
    "verl-overrides": (
        "mhpo.cli.verl_overrides",
        "print verl's Hydra overrides for a config's objective and batch",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mhpo", description="Stable RL for (vision-)language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    if wanted in COMMANDS:  # flags and KEY=VALUE overrides in any order (argparse's intermixed parsing)
        p = argparse.ArgumentParser(prog=f"mhpo {wanted}", description=COMMANDS[wanted][1])
        importlib.import_module(COMMANDS[wanted][0]).add_arguments(p)
        args = p.parse_intermixed_args(argv[1:])
        args.command = wanted
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except UsageError as err:
        print(f"mhpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"mhpo {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"mhpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
