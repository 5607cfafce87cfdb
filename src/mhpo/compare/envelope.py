"""The stability envelope of a sweep: how each objective's accuracy and ratio tails change with one
swept setting (``mhpo compare --sweep KEY=v1,v2,...``, e.g. rollout.staleness).

For every value the runs of that value are one ordinary comparison (:mod:`mhpo.compare.report`:
objectives x seeds, written to ``<out>/<KEY>=<value>/``); the envelope puts the values side by side:

    per objective and value, over seeds (mean and sample std):
        final and best held-out greedy accuracy
        p99 |log r|: the median over the second half of the run of each RL step's p99
        clip fraction: the mean over the second half of the per-step clipped / suppressed fraction
    where a difference exceeds the seed spread: |mean_a - mean_b| > std_a + std_b (reference vs each)

written as envelope.md, envelope.html, envelope.json and envelope.png (one line per objective with a
±1 std band, one panel per measure).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from mhpo.compare.report import RunStats, _finite, aggregate, exceeds_spread, find_runs, load_run, run_stats
from mhpo.errors import UsageError

MEASURES = (  # (key in the aggregate, title, percent)
    ("final_accuracy", "final held-out accuracy", True),
    ("best_accuracy", "best held-out accuracy", True),
    ("p99_abs_log_ratio", "p99 |log r| (median over the 2nd half)", False),
    ("clip_frac", "clipped / suppressed fraction (2nd half)", False),
)


def value_dir(key: str, value) -> str:
    """The folder of one swept value: 'rollout.staleness=4'."""
    return f"{key}={value}"


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'rollout.staleness=0,2,4' -> ('rollout.staleness', ['0', '2', '4']): the values as written,
    each one a dotted override ``KEY=value`` of its runs."""
    key, eq, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not eq or not key or not items:
        raise UsageError(f"--sweep {text!r} must look like KEY=v1,v2,... (e.g. rollout.staleness=0,2,4,8)")
    if len(set(items)) != len(items):
        raise UsageError(f"--sweep {text!r} lists a value twice")
    return key, items


def sweep_table(runs_root: Path, key: str, values: list, target: float, recorded: Path | None = None) -> dict:
    """{value: the aggregate of that value's runs (report.aggregate)} for the values with runs.

    A value with no finished run under ``runs_root`` is read from ``recorded/<KEY>=<value>/report.json``
    where that exists: the report written when its runs were there holds each run's numbers, so an
    envelope can grow by a value after the earlier values' run directories are gone (a new checkout)."""
    out = {}
    for v in values:
        try:
            paths = find_runs([runs_root / value_dir(key, v)])
        except UsageError:  # no finished run of this value (yet)
            rows = recorded_runs(recorded / value_dir(key, v) / "report.json") if recorded else None
            if rows:
                out[v] = aggregate([RunStats(**row) for row in rows])
            continue
        out[v] = aggregate([run_stats(load_run(p), target) for p in paths])
    return out


def recorded_runs(path: Path) -> list[dict] | None:
    """The per-run numbers of a written report.json (its "runs"), or None when there is none."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["runs"] or None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a report.json with a 'runs' list ({e})") from e


def spread_lines(table: dict, key: str, reference: str) -> list[str]:
    """Per value: which objectives' final accuracy and p99 |log r| differ from the reference's beyond
    the seed spread, and which do not."""
    lines = []
    for v, rows in table.items():
        if reference not in rows:
            continue
        ref = rows[reference]
        for measure, name in (("final_accuracy", "final accuracy"), ("p99_abs_log_ratio", "p99 |log r|")):
            beyond = [o for o in rows if o != reference and exceeds_spread(rows[o][measure], ref[measure])]
            within = [o for o in rows if o != reference and o not in beyond]
            lines.append(
                f"{key}={v}, {name}: beyond the seed spread of {reference}: {', '.join(beyond) or 'none'}; "
                f"within: {', '.join(within) or 'none'}"
            )
    return lines


def markdown_tables(table: dict, key: str, objectives: list[str]) -> list[str]:
    values = list(table)
    out = []
    for measure, title, pct in MEASURES:
        out += [f"### {title}", "", f"| objective | {' | '.join(f'{key}={v}' for v in values)} |"]
        out.append("|---" * (len(values) + 1) + "|")
        for o in objectives:
            cells = []
            for v in values:
                row = table[v].get(o)
                if row is None:
                    cells.append("-")
                    continue
                m, s = row[measure]
                cells.append(f"{m:.1%} ± {s:.1%}" if pct else f"{m:.3g} ± {s:.2g}")
                if measure == "final_accuracy":
                    cells[-1] += f" (n={row['n']})"
            out.append(f"| {o} | {' | '.join(cells)} |")
        out.append("")
    return out


def plot(table: dict, key: str, objectives: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(table)
    numeric = all(_is_number(v) for v in values)
    xs = [float(v) for v in values] if numeric else list(range(len(values)))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.2 * len(MEASURES), 3.6))
    for ax, (measure, title, pct) in zip(axes, MEASURES):
        for o in objectives:
            pts = [(x, table[v][o][measure]) for x, v in zip(xs, values) if o in table[v]]
            if not pts:
                continue
            x = [p[0] for p in pts]
            m = [p[1][0] * (100 if pct else 1) for p in pts]
            s = [p[1][1] * (100 if pct else 1) for p in pts]
            (line,) = ax.plot(x, m, marker="o", label=o)
            ax.fill_between(
                x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15, color=line.get_color()
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(key)
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in values])
        if pct:
            ax.set_ylabel("%")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_page(md: list[str], png: Path) -> str:
    """The markdown lines above as one self-contained page (headings, tables, bullets, the PNG inlined)."""
    from html import escape

    out, table = [], []
    for line in [*md, ""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                table.append([escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
            table = []
        if line.startswith("!["):
            img = base64.b64encode(png.read_bytes()).decode()
            out.append(f'<img alt="envelope" src="data:image/png;base64,{img}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{escape(line[2:])}</li>")
        elif line:
            out.append(f"<p>{escape(line)}</p>")
    style = "body{font-family:sans-serif;max-width:1200px} td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><html><head><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_envelope(
    runs_root: str | Path,
    out_dir: str | Path,
    key: str,
    values: list,
    *,
    target: float = 0.5,
    reference: str | None = None,
    order: list[str] | None = None,
    title: str | None = None,
) -> dict:
    """Write envelope.{md,html,json,png} into ``out_dir`` from ``runs_root/<KEY>=<value>/...`` runs (a value
    without runs there from ``out_dir/<KEY>=<value>/report.json``, see :func:`sweep_table`)."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    table = sweep_table(runs_root, key, values, target, recorded=out_dir)
    if not table:
        raise UsageError(f"no finished runs under {runs_root}/{value_dir(key, '<value>')}")
    found = list(dict.fromkeys(o for rows in table.values() for o in rows))
    reference = reference or (order[0] if order else "mhpo" if "mhpo" in found else found[0])
    first = [o for o in [*(order or []), reference] if o in found]
    objectives = list(dict.fromkeys([*first, *found]))  # the given order (or the reference) first, then as found
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(table, key, objectives, out_dir / "envelope.png")
    lines = spread_lines(table, key, reference)
    heading = title or f"Stability envelope over {key}"
    md = [
        f"# {heading}",
        "",
        f"![envelope]({png.name})",
        "",
        f"Mean ± sample std over seeds (n per cell in the first table). Ratio tails: per RL step the p99 of "
        f"|log r| over the update's tokens, summarised by the median over the second half of the run; clip "
        f"fraction: the mean over the second half. A difference is claimed only where |mean_a - mean_b| > "
        f"std_a + std_b (against {reference}).",
        "",
        *markdown_tables(table, key, objectives),
        "## Against the seed spread",
        "",
        *[f"- {line}" for line in lines],
        "",
    ]
    (out_dir / "envelope.md").write_text("\n".join(md))
    (out_dir / "envelope.html").write_text(html_page(md, png))
    result = {
        "key": key,
        "values": list(table),
        "reference": reference,
        "target": target,
        "table": {str(v): rows for v, rows in table.items()},
        "spread": lines,
    }
    (out_dir / "envelope.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False))
    return result
