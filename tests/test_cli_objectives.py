"""`mhpo objectives` and `mhpo plot-multipliers`."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

import reference_math as ref
from mhpo import OBJECTIVES
from mhpo.cli import main
from mhpo.cli.plot_multipliers import multiplier_curve


def test_objectives_table_lists_every_objective_with_defaults(capsys):
    assert main(["objectives", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(OBJECTIVES)
    mhpo_row = rows[0]
    assert "c=1.5, k_pos=1.5, lambda_pos=1.0, k_neg=2.0, lambda_neg=0.8" in mhpo_row
    assert "tanh" in mhpo_row


def test_objectives_rich_table_runs_as_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "mhpo.cli", "objectives"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},  # one line per row: no wrapped cells
    ).stdout
    names = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert names == list(OBJECTIVES)  # whole cells: 'gspo' must not pass for 'gspo-token'
    assert all(name in out for name in OBJECTIVES)


def test_multiplier_curves_are_the_analytic_multipliers():
    r = torch.logspace(-2, 2, 301, dtype=torch.float64)
    for sign in (1.0, -1.0):
        adv = torch.full((len(r), 1), sign, dtype=torch.float64)
        for name in ("mhpo", "grpo", "dapo", "sapo", "cispo", "reinforce", "mhpo-lfm-only"):
            _, m = ref.token_level(name, r.log().unsqueeze(-1), adv, OBJECTIVES[name].defaults)
            torch.testing.assert_close(multiplier_curve(name, r, sign), m.squeeze(-1), rtol=1e-10, atol=1e-14)
        # one-token sequences: the sequence ratio is the token ratio
        for name in ("gspo", "gmpo"):
            M = multiplier_curve(name, r, sign)
            hp = OBJECTIVES[name].defaults
            if name == "gspo":
                inside = (r >= 1 - hp["eps_low"]) & (r <= 1 + hp["eps_high"])
                outside_ok = r > 1 + hp["eps_high"] if sign < 0 else r < 1 - hp["eps_low"]
                keep = inside | outside_ok
            else:
                keep = r.log() <= hp["eps_high"] if sign > 0 else r.log() >= -hp["eps_low"]
            torch.testing.assert_close(M, torch.where(keep, r, 0.0), rtol=1e-10, atol=1e-14)
    assert float(multiplier_curve("mhpo", torch.tensor([1.0], dtype=torch.float64), 1.0)) == math.exp(
        -(math.log(2) ** 1.5) - (math.log(2) / 0.8) ** 2
    )


def test_plot_multipliers_writes_png(tmp_path):
    out = tmp_path / "m.png"
    assert main(["plot-multipliers", "--out", str(out), "--objectives", "mhpo,grpo,sapo"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_multipliers_bad_name_is_one_line_error(tmp_path, capsys):
    assert main(["plot-multipliers", "--out", str(tmp_path / "x.png"), "--objectives", "mhpo,grpx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown objective 'grpx' (did you mean 'grpo'?)" in err
