"""MHPOTrainer (TRL 1.16 GRPOTrainer subclass) on CPU with a tiny local model: it trains, its loss is
`mhpo.policy_loss` on the captured tensors, and it keeps TRL's own conventions (gradient
accumulation, normaliser, KL, masks, vLLM IS correction, eval) — checked against GRPOTrainer's
own `_compute_loss` for the objectives both implement."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed: pip install 'mhpo[trl]' (scripts/setup.sh --dev)")

from datasets import Dataset
from trl import GRPOTrainer

from mhpo import get_objective, policy_loss
from mhpo.integrations.trl import MHPOConfig, MHPOTrainer, loss_from_trl, trl_defaults
from mhpo.models.tiny import tiny_qwen2
from mhpo.models.tokenizer import build_char_tokenizer

GA = 2  # gradient accumulation steps (= steps_per_generation): 2 micro-batches per optimizer step
MICRO = 4  # completions per micro-batch
TOL = dict(rtol=2e-5, atol=1e-7)  # float32, different summation order


def pseudo_reward(completions, **kwargs):
    """Deterministic reward with spread inside every group (so advantages are non-zero)."""
    return [float(sum(map(ord, c)) % 10) / 10 for c in completions]


def make_args(tmp_path, **overrides) -> MHPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=MICRO,
        per_device_eval_batch_size=MICRO,
        gradient_accumulation_steps=GA,
        num_generations=4,
        max_completion_length=8,
        num_iterations=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    return MHPOConfig(**{**base, **overrides})


class RecordingTrainer(MHPOTrainer):
    """Records, per `_compute_loss` call: the inputs, the log-probs it used, the loss and the mode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []
        self._last_logps = None

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._last_logps = out[0].detach().clone()
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.records.append(
            dict(
                inputs={k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()},
                logps=self._last_logps,
                loss=loss.detach().clone(),
                requires_grad=loss.requires_grad,
                mode="train" if self.model.training else "eval",
                window=getattr(self, "current_gradient_accumulation_steps", None),
            )
        )
        return loss


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two optimizer steps (2 micro-batches each, 2 iterations over one generation batch), then evaluate."""
    tok = build_char_tokenizer()
    model = tiny_qwen2(tok)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RecordingTrainer(
        model,
        reward_funcs=pseudo_reward,
        args=make_args(tmp_path_factory.mktemp("mhpo_trl")),
        train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "7-2="]}),
        eval_dataset=Dataset.from_dict({"prompt": ["3+3="]}),
        processing_class=tok,
    )
    trainer.train()
    n_train = len(trainer.records)
    metrics = trainer.evaluate()
    trainer.model.train()
    return dict(
        trainer=trainer,
        initial=initial,
        train=trainer.records[:n_train],
        eval=trainer.records[n_train:],
        eval_metrics=metrics,
    )


def expected_loss(rec, logps=None, **extra):
    """policy_loss("mhpo") on the captured tensors with TRL's normaliser for the record's mode
    (one process, steps_per_generation = GA)."""
    x = rec["inputs"]
    logps = rec["logps"] if logps is None else logps
    share = GA / rec["window"] if rec["mode"] == "train" else 1.0
    loss, _ = policy_loss(
        "mhpo",
        logps,
        x["old_per_token_logps"],
        x["advantages"],
        x["completion_mask"],
        num_tokens=float(x["num_items_in_batch"]) / share,
        **extra,
    )
    return loss


# -- it trains, and ratio control has something to act on -----------------------------------------------


def test_trains_two_steps_and_ratios_move_on_the_second_iteration(run):
    trainer, train = run["trainer"], run["train"]
    assert trainer.state.global_step == 2
    assert [r["mode"] for r in train] == ["train"] * 4 and all(r["requires_grad"] for r in train)
    moved = max(float((p.detach() - run["initial"][n]).abs().max()) for n, p in trainer.model.named_parameters())
    assert moved > 1e-4
    # micro-steps 0, 1: first pass over the generation batch (r = 1); 2, 3: second pass after an update
    for i, rec in enumerate(train):
        assert "old_per_token_logps" in rec["inputs"]  # num_iterations=2 makes TRL keep the old log-probs
        log_r = (rec["logps"] - rec["inputs"]["old_per_token_logps"])[rec["inputs"]["completion_mask"].bool()]
        if i < 2:
            assert float(log_r.abs().max()) < 1e-4
        else:
            assert float(log_r.abs().max()) > 1e-2
    logged = [h for h in trainer.state.log_history if "objective/ratio/max" in h]
    assert logged[0]["objective/ratio/max"] == pytest.approx(1.0, abs=1e-4)
    assert logged[1]["objective/ratio/max"] > 1.01 and logged[1]["objective/ratio/min"] < 0.99
    assert logged[0]["objective/multiplier/mean"] == pytest.approx(0.2651, abs=1e-3)  # MHPO on-policy weight


def test_loss_equals_policy_loss_on_every_captured_batch(run):
    for rec in run["train"]:
        torch.testing.assert_close(rec["loss"], expected_loss(rec), **TOL)


def test_gradient_accumulation_window_sums_to_policy_loss_over_the_generation_batch(run):
    """loss_is_scaled_for_ga: the 2 micro-batches of one optimizer step sum to the token-mean over the
    whole generation batch, and the trainer logs that sum (no second division by the GA steps)."""
    assert MHPOTrainer.loss_is_scaled_for_ga is True
    first, second = run["train"][0], run["train"][1]
    cat = {k: torch.cat([first["inputs"][k], second["inputs"][k]]) for k in ("completion_mask", "advantages")}
    logps = torch.cat([first["logps"], second["logps"]])
    old = torch.cat([first["inputs"]["old_per_token_logps"], second["inputs"]["old_per_token_logps"]])
    whole, _ = policy_loss("mhpo", logps, old, cat["advantages"], cat["completion_mask"])
    assert int(cat["completion_mask"].sum()) == int(first["inputs"]["num_items_in_batch"])
    torch.testing.assert_close(first["loss"] + second["loss"], whole, **TOL)
    logged = run["trainer"].state.log_history[0]["loss"]
    assert logged == pytest.approx(float(first["loss"] + second["loss"]), rel=1e-4, abs=1e-6)


def test_gradient_equals_policy_loss_gradient(run):
    trainer = run["trainer"]
    rec = run["train"][-1]
    x = rec["inputs"]
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    ours = grads(trainer._compute_loss(trainer.model, x))
    ref = expected_loss(rec, trainer._completion_logps(trainer.model, x)[0])
    for a, b in zip(ours, grads(ref)):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_eval_goes_through_prediction_step_without_gradient_or_ga_scaling(run):
    (rec,) = run["eval"]
    assert rec["mode"] == "eval" and not rec["requires_grad"]
    torch.testing.assert_close(rec["loss"], expected_loss(rec), **TOL)
    assert run["eval_metrics"]["eval_loss"] == pytest.approx(float(rec["loss"]), rel=1e-5, abs=1e-7)
    assert "eval_objective/ratio/mean" in run["eval_metrics"]
    assert "eval_entropy" in run["eval_metrics"]


# -- TRL's own conventions: MHPOTrainer == GRPOTrainer where the two define the same loss ---------------


@contextlib.contextmanager
def patched(obj, **attrs):
    saved = {k: getattr(obj, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield obj
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def inputs_for(run, mode):
    """A real batch of ``mode`` with spread ratios: train = the second pass over the generation batch
    (ratios ~[0.3, 4]); eval = the eval batch (its counts describe itself) with old log-probs perturbed."""
    if mode == "train":
        return run["train"][-1]["inputs"]
    x = dict(run["eval"][0]["inputs"])
    g = torch.Generator().manual_seed(1)
    x["old_per_token_logps"] = x["old_per_token_logps"] + 0.6 * torch.randn(x["old_per_token_logps"].shape, generator=g)
    return x


def both_losses(trainer, inputs, mode):
    trainer.model.train(mode == "train")
    try:
        with torch.no_grad():
            ours = MHPOTrainer._compute_loss(trainer, trainer.model, inputs)
            theirs = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    finally:
        trainer.model.train()
    return ours, theirs


# (our objective, our aggregation, our hparams)  <->  (TRL loss_type, TRL trainer attributes)
SHARED = {
    "dapo": (("dapo", "token-mean", {"eps_low": 0.2, "eps_high": 0.28}), ("dapo", {"epsilon_high": 0.28})),
    "grpo": (("grpo", "seq-mean-token-mean", {}), ("grpo", {})),
    "dr_grpo": (("grpo", "seq-mean-token-sum-norm", {}), ("dr_grpo", {})),
    "cispo": (("cispo", "token-mean", {"cap": 5.0}), ("cispo", {"epsilon_high": 5.0})),
    "sapo": (("sapo", "seq-mean-token-mean", {}), ("sapo", {})),
    "gspo": (
        ("gspo", "seq-mean-token-mean", {}),
        ("grpo", {"importance_sampling_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4}),
    ),
}


# mode, steps_per_generation S, accumulation steps G of the window, processes P (the last two patched:
# a generation batch spanning 2 optimizer steps with a short last window; a 2-process normaliser)
SETTINGS = {
    "train": ("train", GA, GA, 1),
    "train-S4-G1": ("train", 4, 1, 1),
    "train-P2": ("train", GA, GA, 2),
    "eval": ("eval", GA, GA, 1),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("case", sorted(SHARED))
def test_same_loss_as_trl_for_shared_objectives(run, case, setting, monkeypatch):
    (name, agg, hp), (loss_type, trl_attrs) = SHARED[case]
    mode, steps_per_generation, window, processes = SETTINGS[setting]
    trainer = run["trainer"]
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: processes))
    attrs = dict(objective=name, loss_agg_mode=agg, objective_hparams=get_objective(name).resolve(hp))
    attrs.update({"loss_type": loss_type, "epsilon_low": 0.2, "epsilon_high": 0.2, **trl_attrs})
    attrs.update(current_gradient_accumulation_steps=window)
    inputs = inputs_for(run, mode)
    if mode == "train":  # the sequence count of the generation batch that setting implies (no empty rows)
        inputs = _with(inputs, num_seqs_in_batch=torch.tensor(MICRO * steps_per_generation * processes))
    with patched(trainer, **attrs), patched(trainer.args, steps_per_generation=steps_per_generation):
        ours, theirs = both_losses(trainer, inputs, mode)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert abs(float(ours)) > 1e-4


def _with(inputs, **extra):
    return {**inputs, **extra}


def _features(inputs):
    """(trainer attributes, extra inputs) for each TRL feature an override must keep."""
    g = torch.Generator().manual_seed(0)
    old = inputs["old_per_token_logps"]
    noise = torch.randn(old.shape, generator=g) * 0.3
    tool_mask = (torch.rand(old.shape, generator=g) < 0.7).long()
    tool_mask[:, 0] = 1
    return {
        "kl": (dict(beta=0.05), dict(ref_per_token_logps=old + noise)),
        "kl_bias_corrected": (dict(beta=0.05), dict(ref_per_token_logps=old + noise)),
        "vllm_is_correction": (
            dict(use_vllm=True, vllm_importance_sampling_correction=True),
            dict(importance_sampling_ratio=torch.rand(old.shape, generator=g) + 0.5),
        ),
        "entropy_mask": (dict(top_entropy_quantile=0.5), {}),
        "tool_mask": ({}, dict(tool_mask=tool_mask)),
        # a threshold below every sequence's KL: drops exactly the negative-advantage rows
        "off_policy_mask": (dict(off_policy_mask_threshold=-10.0), {}),
        "entropy_bonus": (dict(entropy_coef=0.01, _entropy_bonus_enabled=True), {}),
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "feature",
    ["kl", "kl_bias_corrected", "vllm_is_correction", "entropy_mask", "tool_mask", "off_policy_mask", "entropy_bonus"],
)
def test_trl_features_are_kept(run, feature, mode):
    trainer = run["trainer"]
    base = inputs_for(run, mode)
    attrs, extra = _features(base)[feature]
    dapo = dict(objective="dapo", loss_agg_mode="token-mean", objective_hparams=get_objective("dapo").resolve({}))
    dapo.update(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    args_attrs = dict(use_bias_correction_kl=feature == "kl_bias_corrected")
    with patched(trainer, **dapo, **attrs), patched(trainer.args, **args_attrs):
        ours, theirs = both_losses(trainer, _with(base, **extra), mode)
    torch.testing.assert_close(ours, theirs, **TOL)
    with patched(trainer, **dapo):
        without, _ = both_losses(trainer, base, mode)
    assert abs(float(ours - without)) > 1e-6  # the feature changed the loss, so the check has teeth


def test_kl_defaults_match_policy_loss_and_trls_kl_metric(run):
    """MHPOConfig turns TRL's bias-corrected KL (r * k3, TRL's default) off: the KL term is policy_loss's
    beta * k3, and the logged `kl` equals TRL's own metric for that setting."""
    trainer = run["trainer"]
    assert trainer.args.use_bias_correction_kl is False
    rec = run["train"][-1]
    _, extra = _features(rec["inputs"])["kl"]
    inputs = _with(rec["inputs"], **extra)
    # trainer.loss_type is None (MHPOConfig's default): TRL's own loss needs one to run, any logs the same kl
    with patched(trainer, beta=0.05, loss_type="dapo"), torch.no_grad():
        loss = MHPOTrainer._compute_loss(trainer, trainer.model, inputs)
        ours = trainer._metrics["train"]["kl"][-1]
        GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        theirs = trainer._metrics["train"]["kl"][-1]
        logps = trainer._completion_logps(trainer.model, inputs)[0]  # the model after the last update
    want = expected_loss(rec, logps, ref_logp=extra["ref_per_token_logps"], beta=0.05)
    torch.testing.assert_close(loss, want, **TOL)
    assert ours == pytest.approx(theirs, rel=1e-5)


# -- TRL's loss_type: mapped to the objective computing it, or refused; never ignored -------------------

# MHPOConfig overrides (TRL's own field names) -> the trainer attributes TRL's _compute_loss reads from them
LOSS_TYPE_CASES = {
    "grpo": dict(loss_type="grpo"),
    "grpo-eps": dict(loss_type="grpo", epsilon=0.1, epsilon_high=0.3),
    "grpo-delta": dict(loss_type="grpo", delta=1.5),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),  # TRL's dapo: epsilon_high defaults to epsilon (0.2), not DAPO's 0.28
    "dapo-0.28": dict(loss_type="dapo", epsilon_high=0.28),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
    "gspo-token-mean": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
}


@pytest.mark.parametrize("case", sorted(LOSS_TYPE_CASES))
def test_loss_type_selects_the_objective_that_computes_trls_loss(run, case):
    """The objective, aggregation and hparams a loss_type maps to give GRPOTrainer's own loss for it.
    (No MHPOConfig is built here: a new TrainingArguments resets accelerate's state under the trainer;
    test_config_resolves_loss_type_with_loss_from_trl checks that the config uses this same mapping.)"""
    values = {**trl_defaults(), **LOSS_TYPE_CASES[case]}
    objective, agg, hp, _ = loss_from_trl(values.pop("loss_type"), values)
    trainer = run["trainer"]
    ours_attrs = dict(objective=objective, loss_agg_mode=agg, objective_hparams=get_objective(objective).resolve(hp))
    high = values["epsilon"] if values["epsilon_high"] is None else values["epsilon_high"]  # as GRPOTrainer reads it
    trl_attrs = dict(
        loss_type=LOSS_TYPE_CASES[case]["loss_type"],
        epsilon_low=values["epsilon"],
        epsilon_high=high,
        importance_sampling_level=values["importance_sampling_level"],
        current_gradient_accumulation_steps=GA,
    )
    trl_args = {k: values[k] for k in ("delta", "sapo_temperature_pos", "sapo_temperature_neg")}
    inputs = _with(inputs_for(run, "train"), num_seqs_in_batch=torch.tensor(MICRO * GA))
    with patched(trainer, **ours_attrs, **trl_attrs), patched(trainer.args, **trl_args):
        ours, theirs = both_losses(trainer, inputs, "train")
    torch.testing.assert_close(ours, theirs, **TOL)
    assert abs(float(ours)) > 1e-4


# -- configuration ---------------------------------------------------------------------------------------


def test_config_validation_names_bad_values(tmp_path):
    ok = make_args(tmp_path, objective="dapo", objective_hparams='{"eps_high": 0.3}')
    assert ok.resolved_hparams() == {"eps_low": 0.2, "eps_high": 0.3, "dual_clip": None}
    assert make_args(tmp_path).resolved_hparams()["c"] == 1.5  # default: MHPO, paper defaults
    assert make_args(tmp_path, mhpo_c=0.9).resolved_hparams()["c"] == 0.9
    cases = [
        (dict(objective="mhpo2"), r"unknown objective 'mhpo2'.*valid objectives: mhpo, "),
        (dict(mhpo_c=-1.0), r"hparam c=-1.0 is out of range"),
        (dict(objective="gspo", mhpo_c=1.0), r"objective 'gspo'.*unknown hparam 'c'"),
        (dict(mhpo_c=1.0, objective_hparams={"c": 2.0}), r"'c' is set twice"),
        (dict(loss_agg_mode="token-sum"), r"unknown aggregation 'token-sum'; valid aggregations: token-mean"),
        (dict(importance_sampling_level="sequence"), r"use objective='gspo'"),
        (dict(delta=2.0), r"delta=2.0"),
        (dict(use_adaptive_entropy=True), r"use_adaptive_entropy"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            make_args(tmp_path, **overrides)


def test_warns_when_every_update_is_on_policy(tmp_path, caplog):
    tok = build_char_tokenizer()
    args = make_args(tmp_path, num_iterations=1)  # GA = steps_per_generation, one pass: r = 1
    with caplog.at_level(logging.WARNING, logger="mhpo.integrations.trl"):
        MHPOTrainer(
            tiny_qwen2(tok),
            reward_funcs=pseudo_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["1+1="]}),
            processing_class=tok,
        )
    assert "r = 1 exactly" in caplog.text
    with pytest.raises(TypeError, match="MHPOConfig"):
        from trl import GRPOConfig

        MHPOTrainer(
            tiny_qwen2(tok),
            reward_funcs=pseudo_reward,
            processing_class=tok,
            args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            train_dataset=Dataset.from_dict({"prompt": ["1+1="]}),
        )


@pytest.mark.parametrize("case", sorted(LOSS_TYPE_CASES))
def test_config_resolves_loss_type_with_loss_from_trl(tmp_path, case):
    args = make_args(tmp_path, **LOSS_TYPE_CASES[case])
    values = {name: getattr(args, name) for name in trl_defaults()}
    objective, agg, hp, _ = loss_from_trl(args.loss_type, values)
    assert args.resolved_loss() == (objective, agg, get_objective(objective).resolve(hp))


def test_loss_type_mapping_and_defaults(tmp_path):
    assert make_args(tmp_path).resolved_loss() == ("mhpo", "token-mean", get_objective("mhpo").resolve({}))
    assert make_args(tmp_path).loss_type is None  # not TRL's "dapo": without loss_type the loss is MHPO
    grpo = make_args(tmp_path, loss_type="grpo", objective_hparams={"dual_clip": 3.0}).resolved_loss()
    assert grpo == ("grpo", "seq-mean-token-mean", {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 3.0})
    assert make_args(tmp_path, loss_type="dr_grpo", loss_agg_mode="seq-mean-token-sum-norm").resolved_loss()[:2] == (
        "grpo",
        "seq-mean-token-sum-norm",
    )
    assert make_args(tmp_path, loss_type="cispo").resolved_hparams() == {"cap": 0.2, "floor": 0.0}  # TRL: eps = cap
    trainer_args = make_args(tmp_path, loss_type="sapo")
    assert trainer_args.resolved_loss() == ("sapo", "seq-mean-token-mean", {"tau_pos": 1.0, "tau_neg": 1.05})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(loss_type="bnpo"), r"^MHPOConfig: loss_type='bnpo' has no mhpo counterpart: .*use loss_type='dapo'"),
        (dict(loss_type="luspo"), r"loss_type='luspo' has no mhpo counterpart.*use objective='gspo'"),
        (dict(loss_type="vespo"), r"loss_type='vespo' has no mhpo counterpart.*use objective='sapo'"),
        (dict(loss_type="ppo"), r"unknown loss_type 'ppo'; TRL's loss types: grpo, dr_grpo, dapo, cispo, sapo"),
        (dict(loss_type="grpo", objective="mhpo"), r"objective='mhpo' and loss_type='grpo' are both set; set one"),
        (dict(loss_type="grpo", loss_agg_mode="token-mean"), r"contradicts loss_type='grpo'.*'seq-mean-token-mean'"),
        (dict(loss_type="grpo", objective_hparams={"eps_high": 0.3}), r"'eps_high' comes from TRL's fields.*"),
        (dict(loss_type="grpo", delta=1.1), r"delta=1.1 equals a dual clip only .* delta > 1 \+ epsilon_high = 1.2"),
        (dict(loss_type="grpo", sapo_temperature_pos=2.0), r"sapo_temperature_pos=2.0 is a TRL loss field that"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), r"importance_sampling_level='sequence'"),
        (dict(epsilon=0.3), r"epsilon=0.3 is a TRL loss field that objective='mhpo' does not read; use obj"),
        (dict(objective="dapo", epsilon_high=0.28), r"epsilon_high=0.28 .* objective_hparams=\{'eps_high'"),
        (dict(objective="grpo", vespo_k_pos=3.0), r"vespo_k_pos=3.0 is a TRL loss field"),
        (dict(loss_type="grpo", mhpo_c=1.0), r"loss_type='grpo' -> objective 'grpo'.*unknown hparam 'c'"),
    ],
)
def test_loss_type_is_mapped_or_refused_never_ignored(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)
