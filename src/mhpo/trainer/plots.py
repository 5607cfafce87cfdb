"""PNG plots of a run from its logs: reward, accuracy (training and held-out), grad norm."""

from __future__ import annotations

from pathlib import Path

from mhpo.files import read_jsonl


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write reward.png, accuracy.png and grad_norm.png into ``run_dir/plots``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in read_jsonl(run_dir / "evals.jsonl") if r.get("stage") != "warmup"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def figure(name: str, title: str, ylabel: str, lines: list[tuple[str, list, list, str]]) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for label, xs, ys, style in lines:
            if xs:
                ax.plot(xs, ys, style, label=label, linewidth=1.2, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(xs for _, xs, _, _ in lines):
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    figure("reward", "mean reward per step", "reward", [("train reward", *_series(metrics, "reward/mean"), "-")])
    acc_lines = [("train accuracy (sampled)", *_series(metrics, "accuracy"), "-")]
    acc_lines.append(("held-out greedy", *_series(evals, "greedy/accuracy"), "o-"))
    pass_keys = sorted({k for r in evals for k in r if k.startswith("pass@")})
    for key in pass_keys:
        acc_lines.append((f"held-out {key}", *_series(evals, key), "s--"))
    figure("accuracy", "accuracy", "accuracy", acc_lines)
    figure(
        "grad_norm",
        "gradient norm before clipping",
        "grad norm",
        [
            ("mean over minibatches", *_series(metrics, "grad_norm"), "-"),
            ("max", *_series(metrics, "grad_norm/max"), ":"),
        ],
    )
    return written
