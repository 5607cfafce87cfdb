"""What a run shows while it trains and when it ends: the progress bar (or one plain line per RL step
without a terminal), the accuracy lines, the closing summary."""

from __future__ import annotations

import sys

from mhpo.progress import progress_bar
from mhpo.trainer.run_dir import written_outputs


class Progress:
    """Progress of RL (reward, accuracy, step time) or the warm-up (probe accuracy): a rich bar on a
    terminal; without one (nohup, a scheduler, a log file) one plain line per RL step instead
    (nothing when disabled)."""

    def __init__(self, console, enabled: bool, total: int, start: int, label: str = "RL"):
        self.console, self.total, self.start, self.label = console, total, start, label
        self.enabled = enabled and console.is_terminal
        self.lines = enabled and not console.is_terminal and label == "RL"
        self.progress = None

    def __enter__(self):
        if self.enabled:
            fields = (
                "probe acc {task.fields[acc]}"
                if self.label != "RL"
                else "reward {task.fields[reward]}  acc {task.fields[acc]}  {task.fields[dt]} s/step"
            )
            self.progress = progress_bar(
                f"[bold]{self.label}[/]", fields, console=self.console, transient=self.label != "RL"
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(
                self.label, total=self.total, completed=self.start, reward="-", acc="-", dt="-"
            )
        return self

    def __call__(self, step: int, metrics: dict, heldout: float | None = None) -> None:
        if self.lines:
            line = (
                f"step {step}/{self.total}  reward {metrics['reward/mean']:.3f}  train acc {metrics['accuracy']:.1%}"
                + (f"  held-out {heldout:.1%}" if heldout is not None else "")
                + f"  {metrics['time/step']:.2f} s/step"
            )
            self.console.print(line, markup=False, highlight=False)
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                reward=f"{metrics['reward/mean']:.3f}",
                acc=f"{metrics['accuracy']:.1%}",
                dt=f"{metrics['time/step']:.2f}",
            )

    def warmup(self, step: int, acc: float | None) -> None:
        if self.progress is not None:
            fields = {"acc": f"{acc:.1%}"} if acc is not None else {}
            self.progress.update(self.task, completed=step, **fields)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


def accuracy_line(label: str, results: dict, pass_k: int) -> str:
    """'before RL: held-out greedy accuracy 32.5%, pass@8 68.0%'."""
    line = f"{label}: held-out greedy accuracy {results['greedy/accuracy']:.1%}"
    return line + (f", pass@{pass_k} {results[f'pass@{pass_k}']:.1%}" if pass_k else "")


def print_summary(summary: dict, file=None) -> None:
    """The lines `mhpo train` ends with: what ran, accuracy before and after, wall time, outputs."""
    lines = [
        "",
        f"mhpo train: {summary['objective']} on {summary['task']} (model {summary['model']}, "
        f"{summary.get('precision', '?')}, seed {summary['seed']})",
    ]
    w = summary.get("warmup") or {}
    if w:
        lines.append(
            f"  warm-up          {_plural(w.get('steps'), 'supervised step')}, probe accuracy "
            f"{w.get('probe_accuracy', 0):.1%}" + (" (reused from cache)" if w.get("reused") else "")
        )
    if summary.get("accuracy_before_rl") is None:
        lines.append(f"  RL               {_plural(summary['steps'], 'step')}, no held-out evaluation (eval.size=0)")
    else:
        lines.append(
            f"  held-out greedy  {summary['accuracy_before_rl']:.1%} before RL -> {summary['accuracy_after_rl']:.1%} "
            "after "
            f"{_plural(summary['steps'], 'RL step')} ({_plural(summary['heldout_size'], 'problem')})"
        )
    for key in summary:
        if key.startswith("pass@") and key.endswith("_before_rl") and summary[key] is not None:
            name = key[: -len("_before_rl")]
            lines.append(f"  held-out {name:<7} {summary[key]:.1%} -> {summary[name + '_after_rl']:.1%}")
    lines += [
        f"  wall time        {summary['wall_seconds']:.0f} s",
        f"  outputs          {summary['run_dir']}/ ({', '.join(written_outputs(summary))})",
    ]
    print("\n".join(lines), file=file or sys.stdout)


def _plural(n, word: str) -> str:
    """'1 problem', '2 problems' (and 'None problems' never: a missing count prints as '?')."""
    return f"{'?' if n is None else n} {word}{'' if n == 1 else 's'}"
