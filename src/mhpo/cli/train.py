"""`mhpo train`: parse the flags and overrides into a config, then :func:`mhpo.trainer.loop.run_training`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from mhpo.errors import UsageError
from mhpo.trainer.config import Config, ConfigError, commented_yaml, load_config, packaged_configs
from mhpo.trainer.loop import run_training
from mhpo.trainer.progress import print_summary
from mhpo.trainer.run_dir import CONFIG_FILE, load_run_config


def add_arguments(parser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. objective.name=grpo"
    )
    parser.add_argument(
        "--config",
        metavar="FILE_OR_NAME",
        help="YAML config (keys as in --print-config), or a packaged config's name: default, vlm (tiny "
        "vision-language demo), smollm2-short-answers (real model)",
    )
    # Before 0.1.0 `mhpo train --preset NAME` named a packaged config, while `mhpo compare --preset` names
    # objectives plus overrides: one word, two meanings. `train` now takes the name with --config.
    parser.add_argument("--preset", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument(
        "--output-dir", metavar="DIR", help="run directory (default: runs/<task>-<objective>-s<seed>-<time>)"
    )
    parser.add_argument("--steps", type=int, metavar="N", help="RL steps (train.steps)")
    parser.add_argument("--seed", type=int, metavar="S", help="run seed (seed)")
    parser.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="causal LM: a named model (smollm2-135m-instruct), a .gguf file, a local directory or a hub id",
    )
    parser.add_argument("--resume", metavar="DIR", help="continue the stopped run in DIR (only --steps may change)")
    parser.add_argument(
        "--engine",
        choices=("mhpo", "trl"),
        default="mhpo",
        help="mhpo: the built-in trainer; trl: the same config through TRL's GRPOTrainer (mhpo.integrations."
        "trl.MHPOTrainer), scaled out with torchrun / accelerate launch (see mhpo.engines.trl)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the config as commented YAML, with the values the run will use for null/auto keys, and exit",
    )


def run(args) -> int:
    check_no_preset(args)
    trl = getattr(args, "engine", "mhpo") == "trl"
    if trl and args.resume:
        raise UsageError("--resume continues mhpo's own runs; --engine trl runs are not resumable by mhpo train")
    if args.resume:
        if args.config or args.overrides or args.seed is not None or args.model or args.output_dir:
            raise UsageError("--resume DIR continues a run with its saved config; only --steps may be given with it")
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
        if args.steps is not None:
            cfg = _with_steps(cfg, args.steps)
        summary = run_training(cfg, run_dir, resume="require")
    elif args.print_config:
        from mhpo.trainer.defaults import config_warnings, resolved_for_display

        cfg = resolved_for_display(config_from_args(args))
        print(commented_yaml(cfg), end="")
        for warning in config_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    else:
        cfg = config_from_args(args)
        run_dir = Path(args.output_dir) if args.output_dir else default_run_dir(cfg)
        if (run_dir / CONFIG_FILE).exists() and (not trl or os.environ.get("RANK", "0") == "0"):
            raise UsageError(
                f"{str(run_dir)!r} already holds a run; continue it with --resume {run_dir} or pick another "
                "--output-dir"
            )
        if trl:
            from mhpo.engines.trl import run_trl

            if os.environ.get("WORLD_SIZE", "1") != "1" and not args.output_dir:
                raise UsageError("--engine trl with several processes needs --output-dir (the same on every process)")
            summary = run_trl(cfg, run_dir)  # every process trains; process 0 returns the summary
            if not summary:
                return 0
        else:
            summary = run_training(cfg, run_dir, resume="never")
    print_summary(summary)
    return 0


def check_no_preset(args) -> None:
    """The migration message for the old flag (see add_arguments)."""
    if getattr(args, "preset", None) is not None:
        raise UsageError(
            f"mhpo train --preset is now --config: run `mhpo train --config {args.preset}` (a packaged config's "
            f"name or a YAML file; packaged: {', '.join(packaged_configs())})"
        )


def config_from_args(args) -> Config:
    check_no_preset(args)
    overrides = list(args.overrides or [])
    for flag, key in (("steps", "train.steps"), ("seed", "seed"), ("model", "model.name_or_path")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def default_run_dir(cfg: Config) -> Path:
    task = cfg.task.name.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{task}-{cfg.objective.name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _with_steps(cfg: Config, steps: int) -> Config:
    if steps < 0:
        raise UsageError(f"--steps {steps} must be >= 0")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
