"""summary.json and summary.md of an evaluation, computed from the samples.jsonl rows alone.

summary.json:

    {"model": {...}, "settings": {...}, "answer_extraction_rule": "...", "maj_tie_rule": "...",
     "benchmarks": {"math500": {"label", "source", "n_problems", "samples", "avg@K", "pass@1",
                                "pass@2", ..., "maj@K", ["greedy"], "mean_length",
                                "truncation_rate", "no_answer_rate", "settings"}, ...},
     "macro": {"benchmarks": [...], "avg@K", "pass@k"..., "maj@K", ...},     # unweighted means
     "run": {"seconds_this_run", "completion_tokens", ...}}

All metrics are fractions in [0, 1] (summary.md shows percentages).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mhpo.evaluation.metrics import TIE_RULE, benchmark_metrics, macro_average
from mhpo.evaluation.specs import PAPER_ORDER

RENAME = {"length": "mean_length", "truncated": "truncation_rate", "no_answer": "no_answer_rate"}
EXTRACTION_RULES = {
    "boxed": "the content of the last \\boxed{} of the completion, parsed by math-verify; no box = no answer",
    "math-verify": "math-verify's extraction over the whole completion: last \\boxed{}, else the last LaTeX "
    "expression, else the last plain number/expression; nothing found = no answer",
}


def summarize(
    rows: Mapping[str, Sequence[Mapping]],
    specs: Mapping[str, Any],
    settings,
    model_info: Mapping,
    run: Mapping | None = None,
) -> dict:
    """The summary of the rows of each benchmark (see the module docstring)."""
    K, ks = settings.samples, settings.ks
    record = settings.record()
    benches: dict[str, dict] = {}
    for name, bench_rows in rows.items():
        if not bench_rows:
            continue
        metrics = {RENAME.get(k, k): v for k, v in benchmark_metrics(bench_rows, ks).items()}
        spec = specs.get(name)
        benches[name] = {
            "label": getattr(spec, "label", name),
            "source": getattr(spec, "source", name),
            "n_problems": len(bench_rows),
            "samples": K,
            **metrics,
            "settings": record,
        }
    macro = macro_average({n: {k: v for k, v in b.items() if isinstance(v, float)} for n, b in benches.items()})
    return {
        "model": dict(model_info),
        "settings": record,
        "answer_extraction_rule": EXTRACTION_RULES[settings.answer_extraction],
        "maj_tie_rule": TIE_RULE,
        "benchmarks": benches,
        "macro": {"benchmarks": list(benches), **macro},
        "run": dict(run or {}),
    }


def table_order(names: Sequence[str]) -> list[str]:
    """The paper's column order (MATH500, HMMT25, AMC23, AIME25, AIME24) first, then the rest."""
    return [n for n in PAPER_ORDER if n in names] + [n for n in names if n not in PAPER_ORDER]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def render_markdown(summary: Mapping) -> str:
    """A table shaped like the paper's (Avg@K per benchmark and their mean), then every metric per
    benchmark, then the settings."""
    s, benches = summary["settings"], summary["benchmarks"]
    K = s["samples"]
    names = table_order(list(benches))
    model = summary["model"].get("model", "model")
    lines = [f"# mhpo eval: {model}", ""]
    lines.append(
        f"Avg@{K} (%): {K} samples per problem, temperature {s['temperature']}, top-p {s['top_p']}, "
        f"max new tokens {s['max_new_tokens']}, seed {s['seed']}; Avg = unweighted mean over benchmarks."
    )
    lines += [
        "",
        "| model | " + " | ".join(benches[n]["label"] for n in names) + " | Avg |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    lines.append(
        f"| {model} | "
        + " | ".join(_pct(benches[n][f"avg@{K}"]) for n in names)
        + f" | {_pct(summary['macro'].get(f'avg@{K}'))} |"
    )
    ks = s["pass_k"]
    cols = [f"avg@{K}", *(f"pass@{k}" for k in ks), f"maj@{K}"]
    if s.get("greedy"):
        cols.append("greedy")
    head = ["benchmark", "problems", *cols, "mean length (tokens)", "truncated %", "no answer %"]
    lines += ["", "## Every metric (%)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for n in [*names, "macro"]:
        b = summary["macro"] if n == "macro" else benches[n]
        label = "**macro**" if n == "macro" else b["label"]
        problems = sum(benches[m]["n_problems"] for m in names) if n == "macro" else b["n_problems"]
        cells = [
            label,
            str(problems),
            *(_pct(b.get(c)) for c in cols),
            "-" if b.get("mean_length") is None else f"{b['mean_length']:.1f}",
            _pct(b.get("truncation_rate")),
            _pct(b.get("no_answer_rate")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Settings", ""]
    lines.append(f"- model: `{model}`" + "".join(f", {k} `{v}`" for k, v in summary["model"].items() if k != "model"))
    for n in names:
        lines.append(f"- {benches[n]['label']}: {benches[n]['source']}, {benches[n]['n_problems']} problems")
    lines.append(
        f"- sampling: temperature {s['temperature']}"
        + (" (greedy)" if not s["do_sample"] else "")
        + f", top-p {s['top_p']}, top-k off, max new tokens {s['max_new_tokens']}, seed {s['seed']}, "
        f"{s['batch_size']} completions per generate call"
    )
    lines.append(
        f"- prompt template: `{s['template']!r}`; system prompt: "
        + (f"`{s['system_prompt']!r}`" if s["system_prompt"] else "none")
    )
    lines.append(f"- answer extraction (`{s['answer_extraction']}`): {summary['answer_extraction_rule']}")
    lines.append(
        "- scoring: math-verify `verify(parse(gold), parse(answer))` in a hard-killed worker process; "
        "multiple choice: the option letter"
    )
    lines.append(f"- maj@{K}: {summary['maj_tie_rule']}")
    lines.append("- pass@k: unbiased estimator 1 - C(n-c, k) / C(n, k) per problem, averaged")
    return "\n".join(lines) + "\n"
