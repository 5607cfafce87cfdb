"""`mhpo report`: a stability report from finished runs (objectives x seeds on one task).

Per run, from its `evals.jsonl` (held-out evaluations) and `metrics.jsonl` (one line per RL step):

    final_accuracy     greedy accuracy at the last evaluation
    best_accuracy      the highest greedy accuracy over all evaluations (before RL included)
    steps_to_target    first evaluated step with accuracy >= target (None: never reached)
    collapsed          final_accuracy < best_accuracy / 2: fell below half its best, not recovered
    grad_spikes        RL steps whose grad norm (before clipping; the largest of the step's optimizer
                       steps) exceeds 5x the run's median
    max_grad_norm      the largest grad norm over all steps
    p99_abs_log_ratio  the median over the second half of the steps of the per-step p99 of |log r|
    entropy_change     mean entropy of the last 10 steps minus that of the first 10 (fewer for runs
                       shorter than 20 steps: half the steps each; 0 below 2 steps)
    clip_frac          mean over the second half of the steps of the fraction of update tokens whose multiplier is
                       below 0.1 M(1) (gradient clipped away or nearly so)
    response_length    mean completion length (tokens) over the same last steps as entropy_change

Per objective (label), each number as mean +- sample std over seeds; per-step curves with a +-1 std
band over seeds: accuracy, reward, grad norm, entropy, p99 |log r|, clip fraction, MHPO's survival
weight exp(-zeta) (MHPO family only) and response length. A difference between two objectives is said to exceed
the seed spread when |mean_a - mean_b| > std_a + std_b; with fewer than 2 seeds nothing is claimed.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from mhpo.errors import UsageError
from mhpo.files import read_jsonl

SPIKE_FACTOR = 5.0
GRAD_KEY = "grad_norm/max"  # per RL step: the largest grad norm (before clipping) of its optimizer steps
EDGE_STEPS = 10  # steps averaged at each end for the entropy change
CURVES = (  # (file, key, title)
    ("evals", "greedy/accuracy", "held-out greedy accuracy"),
    ("metrics", "reward/mean", "mean reward (training rollouts)"),
    ("metrics", "grad_norm", "grad norm before clipping"),
    ("metrics", "entropy", "entropy per token (training rollouts)"),
    ("metrics", "policy/log_ratio/abs_p99", "p99 |log r| over update tokens"),
    ("metrics", "policy/clip_frac", "clip fraction: tokens with M(r) < 0.1 M(1)"),
    ("metrics", "policy/mhpo/survival_mean", "MHPO survival weight exp(-zeta), token mean"),
    ("metrics", "response_length/mean", "response length (tokens, training rollouts)"),
)


@dataclass
class Run:
    """One finished run: where it is, what it ran, and its logs."""

    path: Path
    label: str  # objective name plus its non-default hparams, e.g. "mhpo[c=0.5]"
    seed: int
    config: dict  # the resolved config, minus seed and objective (what must match across runs)
    evals: list[dict]
    metrics: list[dict]
    summary: dict


@dataclass
class RunStats:
    label: str
    seed: int
    accuracy_before_rl: float
    final_accuracy: float
    best_accuracy: float
    steps_to_target: int | None
    collapsed: bool
    grad_spikes: int
    max_grad_norm: float
    p99_abs_log_ratio: float
    entropy_change: float
    clip_frac: float
    response_length: float
    wall_seconds: float


def run_label(objective: dict) -> str:
    """'name' or 'name[k=v,...]' for the hparams set explicitly in the run's config."""
    hp = objective.get("hparams") or {}
    if not hp:
        return objective["name"]
    return f"{objective['name']}[{','.join(f'{k}={v}' for k, v in sorted(hp.items()))}]"


def load_run(path: str | Path) -> Run:
    """Read a finished run directory (config.yaml, summary.json, evals.jsonl, metrics.jsonl)."""
    from mhpo.trainer.config import to_dict
    from mhpo.trainer.run_dir import load_run_config, read_summary

    path = Path(path)
    cfg = to_dict(load_run_config(path))
    summary = read_summary(path)
    if not summary or not summary.get("complete"):
        raise UsageError(f"{str(path)!r} is not a finished run (no complete summary.json)")
    label = run_label(cfg["objective"])
    rest = {k: v for k, v in cfg.items() if k not in ("seed", "objective")}
    rest["objective"] = {k: v for k, v in cfg["objective"].items() if k not in ("name", "hparams")}
    return Run(
        path, label, cfg["seed"], rest, read_jsonl(path / "evals.jsonl"), read_jsonl(path / "metrics.jsonl"), summary
    )


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories under the given paths (a run dir itself, or any folder containing runs)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{str(p)!r} does not exist")
        if (p / "summary.json").is_file():
            found.append(p)
        else:
            found += sorted(s.parent for s in p.rglob("summary.json") if "warmup" not in s.parts)
    if not found:
        raise UsageError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return found


# ---------------------------------------------------------------------------------------------
# Numbers


def run_stats(run: Run, target: float) -> RunStats:
    acc = [(e["step"], e["greedy/accuracy"]) for e in run.evals if e.get("greedy/accuracy") is not None]
    if not acc:
        raise UsageError(f"{run.path}: evals.jsonl holds no greedy/accuracy")
    final, best = acc[-1][1], max(a for _, a in acc)
    reached = [s for s, a in acc if a >= target]
    grads = [m[GRAD_KEY] for m in run.metrics if m.get(GRAD_KEY) is not None]
    median = statistics.median(grads) if grads else 0.0
    p99 = [m["policy/log_ratio/abs_p99"] for m in run.metrics if m.get("policy/log_ratio/abs_p99") is not None]
    ent = [m["entropy"] for m in run.metrics if m.get("entropy") is not None]
    n = min(EDGE_STEPS, len(ent) // 2)  # the two windows never overlap
    clip = [m["policy/clip_frac"] for m in run.metrics if m.get("policy/clip_frac") is not None]
    length = [m["response_length/mean"] for m in run.metrics if m.get("response_length/mean") is not None]
    tail = length[-max(n, 1) :]
    return RunStats(
        label=run.label,
        seed=run.seed,
        accuracy_before_rl=acc[0][1],
        final_accuracy=final,
        best_accuracy=best,
        steps_to_target=reached[0] if reached else None,
        collapsed=final < best / 2,
        grad_spikes=sum(g > SPIKE_FACTOR * median for g in grads),
        max_grad_norm=max(grads, default=0.0),
        p99_abs_log_ratio=statistics.median(second_half(p99)) if p99 else 0.0,
        entropy_change=(sum(ent[-n:]) / n - sum(ent[:n]) / n) if n else 0.0,
        clip_frac=statistics.fmean(second_half(clip)) if clip else 0.0,
        response_length=sum(tail) / len(tail) if tail else 0.0,
        wall_seconds=float(run.summary.get("wall_seconds", 0.0)),
    )


def second_half(values: list[float]) -> list[float]:
    """The trained phase of a run's per-step values: the second half of its steps (all of one step).
    Ratio tails are summarised over it, not by the maximum over steps: in short runs that falls at
    step 1, where Adam's first update depends only on the gradient's sign, the same for every objective."""
    return values[len(values) // 2 :]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


NUMERIC = (
    "accuracy_before_rl",
    "final_accuracy",
    "best_accuracy",
    "grad_spikes",
    "max_grad_norm",
    "p99_abs_log_ratio",
    "entropy_change",
    "clip_frac",
    "response_length",
    "wall_seconds",
)


def aggregate(stats: list[RunStats]) -> dict:
    """Per label: mean/std of every number, reach and collapse counts, over its seeds."""
    out: dict[str, dict] = {}
    for label in dict.fromkeys(s.label for s in stats):
        runs = [s for s in stats if s.label == label]
        row: dict = {"seeds": [s.seed for s in runs], "n": len(runs)}
        for key in NUMERIC:
            row[key] = mean_std([float(getattr(s, key)) for s in runs])
        reached = [s.steps_to_target for s in runs if s.steps_to_target is not None]
        row["reached_target"] = len(reached)
        row["steps_to_target"] = mean_std([float(x) for x in reached]) if reached else None
        row["collapses"] = sum(s.collapsed for s in runs)
        out[label] = row
    return out


def exceeds_spread(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """|mean_a - mean_b| > std_a + std_b."""
    return abs(a[0] - b[0]) > a[1] + b[1]


def summary_lines(table: dict, reference: str) -> list[str]:
    """Plain-language findings: only what the numbers show, and whether it exceeds the seed spread."""
    n = min(row["n"] for row in table.values())
    lines = []
    if n < 2:
        lines.append(f"Only {n} seed per objective: no difference below can be told from seed noise.")
    for key, name in (("final_accuracy", "final accuracy"), ("best_accuracy", "best accuracy")):
        top = max(row[key][0] for row in table.values())
        best = [label for label, row in table.items() if row[key][0] == top]
        if len(best) == len(table) > 1:
            lines.append(f"Every objective has the same mean {name} ({top * 100:.1f}%).")
        else:
            tied = " (tied)" if len(best) > 1 else ""
            lines.append(f"Highest mean {name}: {', '.join(best)}{tied} ({_pm(table[best[0]][key], pct=True)}).")
        if reference not in table:
            continue
        ref = table[reference][key]
        above, within, below = [], [], []
        for label, row in table.items():
            if label == reference:
                continue
            delta = row[key][0] - ref[0]
            text = f"{label} ({delta * 100:+.1f} pts)"
            if n >= 2 and exceeds_spread(row[key], ref):
                (above if delta > 0 else below).append(text)
            else:
                within.append(text)
        if n >= 2:
            if below:
                lines.append(f"{name.capitalize()} below {reference} by more than the seed spread: {', '.join(below)}.")
            if above:
                lines.append(f"{name.capitalize()} above {reference} by more than the seed spread: {', '.join(above)}.")
            if within:
                lines.append(
                    f"{name.capitalize()} within the seed spread of {reference} (no evidence of a difference): "
                    f"{', '.join(within)}."
                )
    collapsed = [f"{label} ({row['collapses']}/{row['n']})" for label, row in table.items() if row["collapses"]]
    lines.append(
        "Collapses (final accuracy below half the run's best): " + (", ".join(collapsed) if collapsed else "none") + "."
    )
    spiky = max(table, key=lambda k: table[k]["grad_spikes"][0])
    if table[spiky]["grad_spikes"][0] > 0:
        lines.append(
            f"Most grad-norm spikes (> {SPIKE_FACTOR:g}x the run's median): {spiky} "
            f"({_pm(table[spiky]['grad_spikes'])} per run)."
        )
    else:
        lines.append(f"No run had a grad-norm spike (> {SPIKE_FACTOR:g}x its median).")
    return lines


def _pm(ms: tuple[float, float], pct: bool = False, digits: int = 2) -> str:
    if pct:
        return f"{ms[0] * 100:.1f} +- {ms[1] * 100:.1f}%"
    return f"{ms[0]:.{digits}f} +- {ms[1]:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Rendering


def table_rows(table: dict, target: float) -> list[list[str]]:
    header = [
        "objective",
        "seeds",
        "acc. before RL",
        "final acc.",
        "best acc.",
        f"steps to {target:.0%}",
        "collapses",
        "grad spikes",
        "max grad norm",
        "p99 |log r|",
        "entropy change",
        "clip frac.",
        "response length",
    ]
    rows = [header]
    for label, r in table.items():
        reach = (
            "not reached"
            if r["steps_to_target"] is None
            else f"{r['steps_to_target'][0]:.0f} ({r['reached_target']}/{r['n']})"
        )
        rows.append(
            [
                label,
                str(r["n"]),
                _pm(r["accuracy_before_rl"], pct=True),
                _pm(r["final_accuracy"], pct=True),
                _pm(r["best_accuracy"], pct=True),
                reach,
                f"{r['collapses']}/{r['n']}",
                _pm(r["grad_spikes"], digits=1),
                _pm(r["max_grad_norm"]),
                _pm(r["p99_abs_log_ratio"], digits=3),
                _pm(r["entropy_change"], digits=3),
                _pm(r["clip_frac"], digits=4),
                _pm(r["response_length"], digits=1),
            ]
        )
    return rows


def curves(runs: list[Run]) -> dict[str, dict[str, tuple[list[int], list[float], list[float]]]]:
    """Per curve, per label: (steps, mean over seeds, std over seeds), on the steps all seeds share."""
    out: dict = {}
    for source, key, _ in CURVES:
        per_label: dict = {}
        for label in dict.fromkeys(r.label for r in runs):
            series = []
            for r in (r for r in runs if r.label == label):
                recs = r.evals if source == "evals" else r.metrics
                series.append({rec["step"]: rec[key] for rec in recs if rec.get(key) is not None})
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            stats = [mean_std([s[t] for s in series]) for t in steps]
            per_label[label] = (steps, [m for m, _ in stats], [sd for _, sd in stats])
        out[key] = per_label
    return out


def plot_curves(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(runs)
    labels = list(dict.fromkeys(r.label for r in runs))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    paths = []
    for source, key, title in CURVES:
        if not any(data[key][label][0] for label in labels):
            continue  # no run logs it (e.g. the survival weight without an MHPO-family objective)
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        smoothed = False
        nonneg = all(m >= 0 for label in labels for m in data[key][label][1])  # then so is the band
        for i, label in enumerate(labels):
            steps, mean, sd = data[key][label]
            if not steps:
                continue
            if source == "metrics" and len(steps) > 20:  # smooth noisy per-step curves for display
                mean, sd, smoothed = _smooth(mean), _smooth(sd), True
            c = colours(i)
            ax.plot(steps, mean, color=c, lw=1.6, label=label, marker="o" if source == "evals" else None, ms=3)
            low = [max(m - s, 0.0) if nonneg else m - s for m, s in zip(mean, sd)]
            ax.fill_between(steps, low, [m + s for m, s in zip(mean, sd)], color=c, alpha=0.15)
        ax.set_xlabel("RL step")
        note = " (10-step moving average)" if smoothed else ""
        ax.set_title(f"{title}{note}, mean +- 1 std over seeds", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _smooth(xs: list[float], w: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def markdown(rows, lines, plots, meta) -> str:
    md = [f"# Stability report: {meta['title']}", "", meta["setting"], ""]
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731  (a literal | would end the cell)
    md += ["| " + " | ".join(map(cell, rows[0])) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(map(cell, r)) + " |" for r in rows[1:]]
    md += ["", "## Summary", ""] + [f"- {line}" for line in lines] + ["", "## Curves", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", "## Definitions", "", *[f"- {d}" for d in DEFINITIONS], ""]
    return "\n".join(md)


def html_page(rows, lines, plots, meta) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    imgs = "".join(
        f'<img alt="{esc(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    defs = "".join(f"<li>{esc(d)}</li>" for d in DEFINITIONS)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(meta["title"])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:49%;margin:0.5%}}</style></head><body>
<h1>Stability report: {esc(meta["title"])}</h1><p>{esc(meta["setting"])}</p>
<table><tr>{head}</tr>{body}</table><h2>Summary</h2><ul>{items}</ul><h2>Curves</h2>{imgs}
<h2>Definitions</h2><ul>{defs}</ul></body></html>
"""


DEFINITIONS = [
    "Each cell is mean +- sample std over seeds; accuracies are greedy exact-match on the fixed held-out set.",
    "Best accuracy: the highest over all evaluations of a run, the one before RL included.",
    "Steps to target: first evaluated RL step at or above the target, averaged over the runs that reached it (count in "
    "brackets).",
    "Collapse: a run whose final accuracy is below half of its best (it fell and did not recover).",
    "Grad spikes: RL steps whose grad norm before clipping (the largest of the step's optimizer steps) exceeds "
    f"{SPIKE_FACTOR:g}x that run's median; max grad norm is the largest over all steps.",
    "p99 |log r|: the median, over the second half of the RL steps, of the per-step 99th percentile of "
    "|log pi/pi_old| over update tokens (the trained phase; the maximum over steps falls at step 1 in short runs).",
    f"Entropy change: mean per-token entropy of the last {EDGE_STEPS} RL steps minus that of the first {EDGE_STEPS} "
    f"(half the steps each for runs shorter than {2 * EDGE_STEPS}).",
    "Clip frac.: mean over the second half of the RL steps of the share of update tokens whose multiplier M(r) "
    "is below 0.1 M(1) (their "
    "gradient clipped away or nearly so).",
    "Response length: mean completion length in tokens over the same last steps as the entropy change.",
    "A difference exceeds the seed spread when |mean_a - mean_b| > std_a + std_b; this is a rough screen, not a test.",
]


def build_report(
    paths: list[str | Path],
    out_dir: str | Path,
    *,
    target: float = 0.5,
    reference: str | None = None,
    title: str | None = None,
    order: list[str] | None = None,
) -> dict:
    """Load the runs under ``paths``, write report.md, report.html, report.json and PNGs into ``out_dir``.

    Objectives are listed in ``order`` (default: the reference, then as found); the others are
    compared with ``reference`` (default: mhpo if present, else the first)."""
    runs = [load_run(p) for p in find_runs(paths)]
    base = runs[0].config
    for r in runs[1:]:
        if r.config != base:
            diff = sorted(k for k in set(base) | set(r.config) if base.get(k) != r.config.get(k))
            raise UsageError(
                f"runs differ in more than objective and seed ({r.path} vs {runs[0].path}: {', '.join(diff)})"
            )
    seen = {}
    for r in runs:
        if (r.label, r.seed) in seen:
            raise UsageError(f"two runs of {r.label} with seed {r.seed}: {seen[(r.label, r.seed)]} and {r.path}")
        seen[(r.label, r.seed)] = r.path
    labels = list(dict.fromkeys(r.label for r in runs))
    reference = reference or ("mhpo" if "mhpo" in labels else labels[0])
    if reference not in labels:
        raise UsageError(f"--reference {reference!r} is not among the objectives: {', '.join(labels)}")
    order = {label: i for i, label in enumerate(dict.fromkeys([*(order or []), reference, *labels]))}
    runs.sort(key=lambda r: (order.get(r.label, len(order)), r.seed))
    stats = [run_stats(r, target) for r in runs]
    table = aggregate(stats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(runs, out_dir)
    rows = table_rows(table, target)
    lines = summary_lines(table, reference)
    meta = {
        "title": title or f"{base['task']['name']}, {len(table)} objectives x {len({r.seed for r in runs})} seeds",
        "setting": (
            f"task {base['task']['name']}, model {base['model']['name_or_path']}, {base['train']['steps']} RL steps, "
            f"lr {base['optim']['lr']:g}, {base['rollout']['prompts_per_step']} prompts x group "
            f"{base['rollout']['group_size']}, "
            f"{base['update']['num_minibatches']} minibatches x {base['update']['epochs']} epochs, agg "
            f"{base['objective']['agg']}; "
            f"runs differ only in objective and seed; target accuracy {target:.0%}."
        ),
    }
    (out_dir / "report.md").write_text(markdown(rows, lines, plots, meta))
    (out_dir / "report.html").write_text(html_page(rows, lines, plots, meta))
    result = {
        "target": target,
        "reference": reference,
        "objectives": table,
        "runs": [asdict(s) for s in stats],
        "summary": lines,
        "meta": meta,
    }
    (out_dir / "report.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    return result


def _finite(o):
    """NaN and inf floats (nested anywhere) become None: strict JSON has no NaN."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o
