"""`mhpo verl-overrides`: print verl's Hydra overrides for an mhpo config (:mod:`mhpo.engines.verl`)."""

from __future__ import annotations

import sys

from mhpo.errors import UsageError
from mhpo.trainer.config import ConfigError, load_config


def add_arguments(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, as mhpo train")
    parser.add_argument(
        "--config", metavar="FILE_OR_NAME", help="YAML config or a packaged config's name (default: the defaults)"
    )


def run(args) -> int:
    from mhpo.engines.verl import verl_overrides

    try:
        cfg = load_config(args.config, list(args.overrides or []))
    except ConfigError as err:
        raise UsageError(str(err)) from None
    overrides, notes = verl_overrides(cfg)
    print("\n".join(overrides))  # one per line: mapfile -t ARGS < <(mhpo verl-overrides ...)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
