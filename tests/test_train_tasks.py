"""Training a few steps on the other kinds of input: a reasoning-gym task, a JSONL dataset with a
model loaded from a local directory, and reward functions that hang or raise."""

from __future__ import annotations

import json

from _train_helpers import jsonl, small_config
from mhpo.cli import main
from mhpo.models.tiny import build_tiny
from mhpo.trainer.config import TinyModelConfig
from mhpo.trainer.loop import run_training


def test_reasoning_gym_task_trains_a_few_steps(tmp_path):
    cfg = small_config(
        "task.name=rg:leg_counting",
        "task.args.max_animals=3",
        "task.train_size=200",
        "rollout.max_new_tokens=4",
        "warmup.enabled=off",
        "eval.size=8",
        "train.steps=2",
        "train.checkpoint_every=0",
    )
    summary = run_training(cfg, tmp_path / "rg")
    metrics = jsonl(tmp_path / "rg" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("reward/reasoning_gym" in m and m["reward/timeouts"] == 0 for m in metrics)
    assert summary["task"] == "rg:leg_counting" and summary["warmup"] == {}
    final = jsonl(tmp_path / "rg" / "evals.jsonl")[-1]
    assert final["step"] == 2 and summary["accuracy_after_rl"] == final["greedy/accuracy"]
    assert (summary["accuracy_after_rl"] * 8).is_integer()  # greedy exact match over eval.size = 8 problems


def test_jsonl_dataset_with_a_model_from_a_local_directory(tmp_path, capsys):
    # a causal LM saved to disk, with a chat template: the trainer applies it
    model, tok = build_tiny(TinyModelConfig(hidden_size=64, intermediate_size=128), seed=1)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    model_dir = tmp_path / "my-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i}+{i}=", "answer": str(2 * i), "source": "x"}) + "\n" for i in range(60))
    )

    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--output-dir",
            str(tmp_path / "run"),
            "--steps",
            "3",
            "--seed",
            "1",
            "task.name=dataset",
            f"task.path={data}",
            "task.prompt_column=question",
            "rollout.max_new_tokens=4",
            "eval.size=10",
            "eval.pass_k=2",
            "rollout.prompts_per_step=4",
            "rollout.group_size=3",
            "train.progress=false",
            "train.plots=false",
            "train.checkpoint_every=0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "held-out greedy" in out and "wall time" in out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == str(model_dir) and summary["warmup"] == {}  # no warm-up for a given model
    assert len(jsonl(run / "metrics.jsonl")) == 3
    samples = jsonl(run / "samples" / "step_000000.jsonl")
    assert len(samples) == 10 and all(
        s["prompt"].startswith("[user]") and s["prompt"].endswith("[assistant]") for s in samples
    )

    assert main(["eval", str(run), "eval.pass_k=0", "eval.size=6"]) == 0
    record = json.loads((run / "eval" / "step_000003.json").read_text())
    assert record["heldout_size"] == 6 and "greedy/accuracy" in record["results"]


REWARDS = """
def flaky(prompts, completions, answer, **kw):
    key = sum(map(ord, prompts[0])) % 4
    if key == 0:
        while True:
            pass
    if key == 1:
        raise ValueError("bad completion")
    return [float(completions[0].strip() == answer[0])]
"""


def test_hanging_and_raising_reward_functions_never_stop_training(tmp_path):
    f = tmp_path / "flaky.py"
    f.write_text(REWARDS)
    cfg = small_config(
        f"rewards.functions=[exact_match, {f}:flaky]",
        "rewards.timeout_s=0.3",
        "warmup.enabled=off",
        "rollout.prompts_per_step=6",
        "rollout.group_size=2",
        "eval.size=6",
        "eval.pass_k=0",
        "train.steps=2",
        "train.checkpoint_every=0",
    )
    summary = run_training(cfg, tmp_path / "run")
    metrics = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert sum(m["reward/timeouts"] for m in metrics) > 0
    assert sum(m["reward/errors"] for m in metrics) > 0
    assert any(
        "ValueError: bad completion" in m.get("reward/first_error", "")
        or "TimeoutError" in m.get("reward/first_error", "")
        for m in metrics
    )
    assert summary["steps"] == 2


def test_kl_reference_dr_grpo_filtering_epochs_micro_batches_and_schedule(tmp_path):
    """The less common switches together: KL to a frozen reference (beta > 0), Dr. GRPO advantages
    with zero-variance groups dropped, two epochs of three minibatches in micro-batches of 5, and a
    cosine lr schedule with warm-up. A length-based reward gives the untrained model's groups some
    variance."""
    f = tmp_path / "shaped.py"
    f.write_text("def length(prompts, completions, **kw):\n    return [float(len(completions[0]) % 3 == 0)]\n")
    cfg = small_config(
        "warmup.enabled=off",
        "objective.name=grpo",
        "objective.beta=0.05",
        "advantage.estimator=dr_grpo",
        "advantage.drop_zero_std=true",
        "update.epochs=2",
        "update.num_minibatches=3",
        "update.micro_batch_size=5",
        "optim.schedule=cosine",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "objective.agg=seq-mean-token-sum-norm",
        "task.name=sort",
        "task.args.length=3",
        f"rewards.functions=[exact_match, {f}:length]",
        "rollout.temperature=2.0",
        "train.steps=4",
        "train.checkpoint_every=0",
        "eval.pass_k=0",
    )
    run_training(cfg, tmp_path / "run")
    metrics = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [round(m["lr"] / 1e-3, 6) for m in metrics] == [0.5, 1.0, 1.0, 0.5]  # warm-up, then cosine toward 0
    assert any(0 < m["groups/zero_std_frac"] < 1 for m in metrics)
    for m in metrics:
        kept = m["update/rows"]
        assert kept == round(32 * (1 - m["groups/zero_std_frac"]))  # zero-variance groups left out
        assert m["update/optimizer_steps"] == 2 * min(3, kept)
        if kept:
            assert m["policy/kl"] >= 0 and "policy/ratio/mean" in m
