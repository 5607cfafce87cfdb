"""`mhpo plot-multipliers`: M(r) = (dJ/dlogp)/A against r for every objective, A > 0 and A < 0.

Each objective is evaluated on one-token sequences (so a sequence ratio equals the token ratio),
and M is taken from autograd, not from a formula: the plot shows what the gradient really is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mhpo.errors import UsageError
from mhpo.objectives import OBJECTIVES, get_objective
from mhpo.objectives.loss import policy_loss


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="multipliers.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--objectives", default=None, help="comma-separated names (default: all)")


def multiplier_curve(name: str, r: torch.Tensor, sign: float, **hparams) -> torch.Tensor:
    """M(r) for one objective via autograd: d(sum_i j_i)/d logp_i / A on [N, 1] one-token rows."""
    log_r = r.log().unsqueeze(-1).double()  # [N, 1]
    logp = log_r.clone().requires_grad_(True)  # old_logp = 0, so log r = logp
    adv = torch.full((len(r),), sign, dtype=torch.float64)
    mask = torch.ones_like(log_r, dtype=torch.bool)
    loss, _ = policy_loss(name, logp, torch.zeros_like(log_r), adv, mask, num_tokens=1.0, stats=False, **hparams)
    (grad,) = torch.autograd.grad(loss, logp)
    return (-grad / sign).squeeze(-1)  # loss = -sum j, so dJ/dlogp = -grad


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = args.objectives.split(",") if args.objectives else list(OBJECTIVES)
    for n in names:
        try:
            get_objective(n)
        except ValueError as err:
            raise UsageError(str(err)) from None
    r = torch.logspace(-2, 2, 801, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, sign in zip(axes, (1.0, -1.0)):
        for name in names:
            style = "-" if name.startswith("mhpo") else "--"
            ax.plot(r.numpy(), multiplier_curve(name, r, sign).numpy(), style, label=name, lw=1.6)
        ax.set_xscale("log")
        ax.set_xlabel("r = pi / pi_old")
        ax.set_title(f"A {'>' if sign > 0 else '<'} 0")
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("M(r) = (dJ/dlogp) / A")
    axes[0].set_ylim(-0.05, 2.5)
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle("Gradient multiplier per token: hard clips (zero), soft gates, MHPO's modulator")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0
