"""Config loading, dotted overrides and the one-line validation messages of `mhpo train`."""

from __future__ import annotations

import pytest

from mhpo.cli import main
from mhpo.trainer.config import Config, ConfigError, check_override, from_dict, load_config, to_dict, to_yaml
from mhpo.trainer.defaults import config_warnings, resolve_defaults, resolved_for_display
from mhpo.trainer.run_dir import config_changes, resumed_config


def test_the_defaults_are_the_dataclasses_and_print_as_commented_yaml_that_loads_back(tmp_path, capsys):
    cfg = load_config()
    assert cfg.model.name_or_path == "tiny"
    assert cfg.objective.name == "mhpo"
    assert cfg.task.name == "addition" and cfg.task.args == {}
    assert cfg == Config() == load_config("default")  # the packaged 'default' preset adds nothing
    assert from_dict(to_dict(cfg)) == cfg
    assert main(["train", "--print-config", "objective.name=grpo", "optim.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    assert (
        "  lr: 0.0003  # AdamW lr" in text
        and "schedule: constant  # lr decay after warm-up; constant | linear | cosine" in text
    )
    (tmp_path / "printed.yaml").write_text(text)  # the values the run will use: nulls and autos resolved
    wanted = resolved_for_display(load_config(None, ["objective.name=grpo", "optim.lr=3e-4"]))
    assert load_config(tmp_path / "printed.yaml") == wanted
    assert (wanted.model.dtype, wanted.rollout.max_new_tokens, wanted.train.threads) == ("float32", 5, 1)


def test_a_pretrained_model_gets_a_pretrained_lr_and_a_toy_lr_is_warned_about(capsys):
    assert main(["train", "--print-config", "--model", "org/a-model", "task.name=chat_addition"]) == 0
    out = capsys.readouterr()
    assert "  lr: 1.0e-06  # AdamW lr" in out.out and "  size: 32  #" in out.out and "  pass_k: 0  #" in out.out
    assert "  max_new_tokens: 32  # null: the task's budget" in out.out and not out.err
    assert main(["train", "--print-config", "--model", "org/a-model", "optim.lr=2e-4"]) == 0
    assert "warning: optim.lr=0.0002 is a tiny-model learning rate" in capsys.readouterr().err
    assert config_warnings(load_config(None, ["optim.lr=2e-4"])) == []  # the built-in tiny model's own lr


def test_a_resume_keeps_the_resolved_values_where_the_request_leaves_them_unset():
    saved = resolve_defaults(load_config(None, ["train.steps=5"]), 5)
    assert config_changes(saved, load_config(None, ["train.steps=9"])) == []  # nulls, auto: the saved values stand
    assert config_changes(saved, load_config(None, ["optim.lr=1e-3"])) == ["optim.lr"]
    resumed = resumed_config(saved, load_config(None, ["train.steps=9", "train.threads=2"]))
    assert (resumed.train.steps, resumed.train.threads, resumed.optim.lr) == (9, 2, 2e-4)


def test_omegaconf_overrides_interpolation_and_added_keys():
    cfg = load_config(None, ["optim.lr=${warmup.lr}", "+objective.hparams.c=0.5", "eval.seed=${seed}", "seed=3"])
    assert cfg.optim.lr == cfg.warmup.lr == 2e-3
    assert cfg.objective.hparams == {"c": 0.5}
    assert cfg.eval.seed == 3  # interpolations resolve after every layer is merged
    with pytest.raises(ConfigError, match="optim.nope"):
        load_config(None, ["optim.lr=${optim.nope}"])


def test_overrides_take_precedence_over_file_and_default(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("objective:\n  name: grpo\nrollout:\n  group_size: 4\noptim:\n  lr: 1e-3\n")
    cfg = load_config(f, ["rollout.group_size=16", "objective.hparams.eps_high=0.3", "task.args.digits=2"])
    assert cfg.objective.name == "grpo"  # from the file
    assert cfg.rollout.group_size == 16  # override beats the file
    assert cfg.optim.lr == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string; coerced to float
    assert cfg.objective.hparams == {"eps_high": 0.3}
    assert cfg.task.args == {"digits": 2}
    assert cfg.rollout.prompts_per_step == Config().rollout.prompts_per_step


def test_resolved_config_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7", "objective.name=dapo", "rewards.functions=[exact_match, mymod:fn]"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("rollout.grup_size=3", ["rollout.grup_size", "did you mean 'group_size'", "valid keys in 'rollout'"]),
        ("rollout.group_size=1", ["rollout.group_size", "must be >= 2"]),
        ("advantage.estimator=ppo", ["advantage.estimator", "'ppo'", "grpo, dr_grpo"]),
        ("train.steps=many", ["train.steps", "must be an integer", "'many'"]),
        ("rollout.temperature=true", ["rollout.temperature", "must be a number"]),
        ("optim.schedule=cosin", ["optim.schedule", "did you mean 'cosine'", "constant, linear, cosine"]),
        ("nonsense=1", ["unknown config key 'nonsense'", "valid keys at the top level"]),
        ("rollout=3", ["'rollout' must be a mapping"]),
        ("rollout.top_p=1.5", ["rollout.top_p", "in (0, 1]"]),
    ],
)
def test_structural_errors_name_the_key_and_the_valid_choices(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.subkey=value"):
        check_override("rollout.group_size")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/run.yaml")


def _cli_error(capsys, argv, monkeypatch) -> str:
    """Run `mhpo train ...` in-process; any model loading is an error (validation must come first)."""
    import mhpo.models.loading as loading
    import mhpo.models.tiny as tiny

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before validation failed")

    monkeypatch.setattr(tiny, "build_tiny", no_model)
    monkeypatch.setattr(loading, "load_pretrained", no_model)
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["objective.name=mhpoo"], ["unknown objective 'mhpoo'", "did you mean 'mhpo'", "valid objectives:", "grpo"]),
        (["objective.hparams.c=-1"], ["objective 'mhpo'", "c=-1", "> 0"]),
        (["objective.hparams.eps=0.2"], ["unknown hparam 'eps'", "valid hparams: c, k_pos"]),
        (["objective.agg=mean"], ["objective.agg", "token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"]),
        (["task.name=additon"], ["unknown task 'additon'", "did you mean 'addition'", "valid tasks:"]),
        (["task.args.digits=12"], ["task 'addition'", "digits=12", "[1, 9]"]),
        (["task.args.width=3"], ["unknown argument 'width'", "valid arguments: digits"]),
        (["task.name=rg:leg_countin"], ["unknown reasoning-gym dataset 'leg_countin'", "did you mean 'leg_counting'"]),
        (["task.name=dataset"], ["needs task.path"]),
        (["task.name=dataset", "task.path=/no/such/file.jsonl"], ["does not exist"]),
        (["rewards.functions=[exact_mach]"], ["unknown reward function 'exact_mach'", "did you mean 'exact_match'"]),
        (["rewards.functions=[no_such_module_xyz:fn]"], ["module 'no_such_module_xyz' cannot be found"]),
        (["rewards.weights=[1, 2]"], ["rewards.weights", "1 finite number"]),
        (["--model", "/no/such/model/dir"], ["model '/no/such/model/dir' is not a directory"]),
        (["--steps", "-3"], ["train.steps", ">= 0"]),
        (["task.args.digits=1", "eval.size=200"], ["could not draw 200 distinct examples"]),
    ],
)
def test_cli_rejects_bad_values_with_one_line_before_loading_a_model(capsys, monkeypatch, tmp_path, argv, fragments):
    err = _cli_error(capsys, [*argv, "--output-dir", str(tmp_path / "run")], monkeypatch)
    assert err.startswith("mhpo train: error: ")
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "run").exists()


def test_reward_function_that_cannot_be_imported_is_reported(capsys, monkeypatch, tmp_path):
    f = tmp_path / "rew.py"
    f.write_text("def other(prompts, completions, **kw):\n    return [0.0]\n")
    err = _cli_error(capsys, [f"rewards.functions=[{f}:missing]", "--output-dir", str(tmp_path / "run")], monkeypatch)
    assert "has no attribute 'missing'" in err


def test_existing_run_dir_needs_resume(capsys, monkeypatch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config()))
    err = _cli_error(capsys, ["--output-dir", str(run)], monkeypatch)
    assert "already holds a run" in err and "--resume" in err


def test_resume_of_a_directory_without_a_run(capsys, monkeypatch, tmp_path):
    err = _cli_error(capsys, ["--resume", str(tmp_path)], monkeypatch)
    assert "is not a run directory" in err
