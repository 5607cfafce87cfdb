"""LoRA adapters (model.lora.*) and gradient checkpointing (model.gradient_checkpointing) in
`mhpo train`: config validation, only the adapters train, our decode loop and log-prob code on a
peft model, the KL reference as the adapters-disabled policy, adapter checkpoints (save, exact
resume, merge, `mhpo eval RUN_DIR`), and gradient checkpointing that leaves sampling's KV cache and
the update's gradients as they were. Tiny model; the real-model test is in test_real_model.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import ENV, SMALL, jsonl, mhpo_cli
from mhpo.errors import UsageError
from mhpo.generation.decode import decode, prefill
from mhpo.generation.rollout import sample
from mhpo.models.logprobs import decoder
from mhpo.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, enable_gradient_checkpointing, is_peft, merged
from mhpo.tasks import build_task
from mhpo.trainer.checkpoint import read_state, save_checkpoint
from mhpo.trainer.config import ConfigError, load_config
from mhpo.trainer.metrics import strip_timing
from mhpo.trainer.setup import build_policy, model_loader, prepare_run
from mhpo.trainer.update import completion_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices; and the same kernels every call

BASE = ["model.dtype=float32", "warmup.enabled=off", "optim.lr=1e-3", "train.report_to=[]"]


def _cfg(*overrides):
    return load_config(None, [*SMALL, *BASE, *overrides])


def _policy(*overrides):
    cfg = _cfg(*overrides)
    return cfg, build_policy(cfg, model_loader(cfg), "tiny", "tiny")


def _prompts(pol, n=3):
    task = build_task(_cfg().task)
    return pol.encoder(task.heldout(n, 7))


def _randomise_adapters(model, seed=0):
    """Give every adapter weight a random value (lora_B is zero at first), so the adapters change the
    model's outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model, prompts):
    with torch.no_grad():
        return model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.lora.rank=-1", ["'model.lora.rank'", ">= 0"]),
        ("model.lora.alpha=0", ["'model.lora.alpha'", "> 0"]),
        ("model.lora.dropout=1.0", ["'model.lora.dropout'", "in [0, 1)"]),
        ("model.lora.rnk=4", ["'model.lora.rnk'", "rank, alpha, dropout, target_modules, merge"]),
        ("model.gradient_checkpointing=maybe", ["'model.gradient_checkpointing'", "true or false"]),
    ],
)
def test_bad_lora_settings_name_the_key_and_the_valid_values(override, words):
    with pytest.raises(ConfigError) as err:
        _cfg(override)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_target_module_that_matches_nothing_names_it_and_lists_the_linear_modules():
    with pytest.raises(UsageError) as err:
        _policy("model.lora.rank=4", "model.lora.target_modules=[q_proj,qkv_proj]")
    message = str(err.value)
    assert "\n" not in message and "'qkv_proj'" in message and "model.lora.target_modules" in message
    for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"):
        assert name in message
    assert "lm_head" not in message


def test_an_empty_target_module_list_is_a_usage_error():
    with pytest.raises(UsageError, match="model.lora.target_modules"):
        prepare_run(_cfg("model.lora.rank=4", "model.lora.target_modules=[]")).close()


def test_the_cli_prints_a_bad_target_module_as_one_line_and_leaves_no_run(tmp_path):
    args = ("train", "--steps", "1", *SMALL, *BASE, "model.lora.rank=4", "model.lora.target_modules=[qq]")
    for _ in range(2):  # the failed start leaves no run directory behind, so the same command fails the same way
        p = mhpo_cli(*args, cwd=tmp_path)
        assert p.returncode == 2, p.stderr
        assert "'qq' matches no linear module" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------------------------------------
# The policy: only the adapters train, the reference is the base model.


def test_only_the_adapters_train():
    _, pol = _policy("model.lora.rank=4", "model.lora.target_modules=[q_proj,v_proj]")
    assert is_peft(pol.model)
    trained = [n for n, p in pol.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_A" in n or "lora_B" in n for n in trained)
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "v_proj"}
    in_optimizer = {id(p) for g in pol.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in pol.model.parameters() if p.requires_grad}
    scale = pol.model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert scale == 2.0  # alpha unset: 2 x rank


def test_fresh_adapters_are_seeded_by_the_run_seed():
    weights = [dict(_policy("model.lora.rank=4", f"seed={s}")[1].model.named_parameters()) for s in (1, 1, 2)]
    a_keys = [k for k in weights[0] if "lora_A" in k]
    assert a_keys and all(torch.equal(weights[0][k], weights[1][k]) for k in a_keys)
    assert not torch.equal(weights[0][a_keys[0]], weights[2][a_keys[0]])


def test_full_fine_tuning_is_unchanged_at_rank_0():
    _, pol = _policy()
    assert not is_peft(pol.model)
    assert sum(len(g["params"]) for g in pol.optimizer.param_groups) == len(list(pol.model.parameters()))


def test_zero_initialised_adapters_sample_the_base_models_tokens():
    """Our decode loop (shared prompt prefill included) on a peft model: B = 0 at the start, so
    sampling with the same seed and greedy decoding give the base model's tokens, token for token."""
    _, base = _policy()
    _, pol = _policy("model.lora.rank=8", "model.lora.target_modules=[all-linear]")
    prompts = _prompts(pol)
    settings = dict(max_new_tokens=12, eos_ids=pol.eos_ids, pad_id=pol.tokenizer.pad_token_id, group_size=4)
    for do_sample in (True, False):
        runs = []
        for model in (base.model, pol.model):
            torch.manual_seed(11)
            runs.append(
                decode(model.eval(), prompts["input_ids"], prompts["attention_mask"], do_sample=do_sample, **settings)
            )
        assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].logprobs, runs[1].logprobs)
    # and adapters that are not zero change what is sampled
    _randomise_adapters(pol.model)
    torch.manual_seed(11)
    moved = decode(pol.model, prompts["input_ids"], prompts["attention_mask"], do_sample=False, **settings)
    assert not torch.equal(moved.tokens, runs[0].tokens)


def test_the_kl_reference_is_the_policy_with_its_adapters_disabled():
    _, base = _policy()
    _, pol = _policy("model.lora.rank=4", "objective.beta=0.1")
    assert pol.reference is pol.model  # no second copy of the weights
    _randomise_adapters(pol.model)
    torch.manual_seed(0)
    rollout = sample(pol.model, pol.tokenizer, _prompts(pol), group_size=2, max_new_tokens=8, eos_ids=pol.eos_ids)
    with torch.no_grad():
        want, _ = completion_logprobs(base.model, rollout, 1.0, False)
        with pol.reference_scope():
            ref, _ = completion_logprobs(pol.reference, rollout, 1.0, False)
        policy, _ = completion_logprobs(pol.model, rollout, 1.0, False)
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)  # outside the scope the adapters are on


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing.


@pytest.mark.parametrize("lora", [[], ["model.lora.rank=4"]], ids=["full", "lora"])
def test_gradient_checkpointing_keeps_the_cache_and_the_gradients(lora):
    """Sampling (in eval mode) still prefills and uses the KV cache: same tokens as without
    checkpointing; the update's forward + backward (shared prompts, train mode) gives the same
    gradients up to float rounding."""
    _, plain = _policy(*lora)
    _, ckpt = _policy(*lora, "model.gradient_checkpointing=true")
    for pol in (plain, ckpt):
        _randomise_adapters(pol.model)
    assert ckpt.model.training
    inner = ckpt.model.get_base_model() if is_peft(ckpt.model) else ckpt.model
    assert inner.is_gradient_checkpointing
    prompts = _prompts(plain)
    rollouts = []
    for pol in (plain, ckpt):
        torch.manual_seed(5)
        rollouts.append(sample(pol.model, pol.tokenizer, prompts, group_size=4, max_new_tokens=10, eos_ids=pol.eos_ids))
        assert pol.model.training  # sample() restores train mode
    assert torch.equal(rollouts[0].input_ids, rollouts[1].input_ids)
    ckpt.model.eval()
    cache, _ = prefill(ckpt.model, prompts["input_ids"], prompts["attention_mask"], 4)
    assert cache.get_seq_length() == prompts["input_ids"].shape[1]  # the prompt's keys and values are cached
    ckpt.model.train()
    calls = []
    decoder(ckpt.model).register_forward_hook(lambda *_: calls.append(1))
    grads = []
    for pol in (plain, ckpt):
        pol.model.zero_grad()
        logp, _ = completion_logprobs(pol.model, rollouts[0], 1.0, False)
        (logp * rollouts[0].completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in pol.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        scale = float(grads[0][name].abs().max())
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4 * scale), (
            name
        )  # float rounding: the shared prompt pass vs one pass
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    assert len(calls) == 1  # checkpointed layers drop a KV cache: no shared-prompt pass, which would be wasted


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def test_adapter_checkpoint_reloads_exactly_and_merges_into_a_plain_model(tmp_path):
    cfg, pol = _policy("model.lora.rank=4", "model.lora.target_modules=[all-linear]")
    _randomise_adapters(pol.model)
    prompts = _prompts(pol)
    pol.model.eval()
    want = _logits(pol.model, prompts)
    args = dict(tokenizer=pol.processor, optimizer=pol.optimizer, scheduler=pol.scheduler, state={}, keep=2)
    path = save_checkpoint(tmp_path / "checkpoints", 3, model=pol.model, **args)
    files = set(read_state(path)["files"])
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, "optimizer.safetensors"} <= files and "model.safetensors" not in files
    saved = load_file(str(path / ADAPTER_WEIGHTS))
    assert saved and all("lora_" in k for k in saved)
    assert json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "tiny"
    # the one loader: base model + the checkpoint's adapters
    model, _ = model_loader(cfg)(str(path))
    assert is_peft(model) and torch.equal(_logits(model.eval(), prompts), want)
    # merged: a plain model, written as kind "model", loads without peft and gives the same logits
    plain = merged(pol.model)
    assert not is_peft(plain) and is_peft(pol.model)
    merged_ckpt = save_checkpoint(tmp_path / "checkpoints", 4, model=plain, kind="model", **args)
    assert (merged_ckpt / "model.safetensors").is_file() and not (merged_ckpt / ADAPTER_CONFIG).exists()
    reloaded, _ = model_loader(cfg)(str(merged_ckpt))
    assert not is_peft(reloaded)
    assert torch.allclose(_logits(reloaded.eval(), prompts), want, atol=1e-4)


def test_gradient_checkpointing_can_be_enabled_on_a_peft_model():
    _, pol = _policy("model.lora.rank=4")
    enable_gradient_checkpointing(pol.model)
    assert pol.model.get_base_model().is_gradient_checkpointing


STEPS = 8
RUN = [  # one-digit sums, a warm-up to ~20% and hot sampling: groups with mixed rewards, so the adapters train
    *SMALL,
    "task.args={digits: 1}",
    "warmup.max_steps=300",
    "warmup.eval_every=25",
    "rollout.temperature=2.0",
    "model.lora.rank=8",
    "model.lora.target_modules=[all-linear]",
    "optim.lr=1e-2",
    "objective.beta=0.05",
    "model.gradient_checkpointing=true",
    "train.checkpoint_every=4",
    "train.report_to=[]",
    "eval.every=0",
]


def _train(run, cache, *extra, env=None):
    return mhpo_cli(
        "train",
        "--output-dir",
        str(run),
        "--steps",
        str(STEPS),
        "--seed",
        "3",
        *RUN,
        f"warmup.cache_dir={cache}",
        *extra,
        env=env,
        timeout=600,
    )


def test_a_killed_lora_run_resumes_to_the_uninterrupted_adapters_and_metrics(tmp_path):
    cache, ref, run = tmp_path / "warmup-cache", tmp_path / "ref", tmp_path / "run"
    done = _train(ref, cache)
    assert done.returncode == 0, done.stderr
    died = _train(run, cache, env={"MHPO_FAULT": "step:6"})  # dies after step 6 is logged
    assert died.returncode == 75, died.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    resumed = mhpo_cli("train", "--resume", str(run), env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    a, b = jsonl(ref / "metrics.jsonl"), jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert strip_timing(x) == strip_timing(y), x["step"]
    assert sum(m["grad_norm"] > 0 for m in b) >= STEPS - 1  # step 1 may have no signal (equal rewards, KL 0)
    assert b[-1]["policy/kl"] > 0  # the reference (adapters disabled) stayed the base model
    final = f"step_{STEPS:06d}"
    wa = load_file(str(ref / "checkpoints" / final / ADAPTER_WEIGHTS))
    wb = load_file(str(run / "checkpoints" / final / ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k)  # the adapters trained
    assert not (run / "checkpoints" / final / "model.safetensors").exists()
    opt = load_file(str(run / "checkpoints" / final / "optimizer.safetensors"))
    assert {int(k.split(".")[1]) for k in opt} == set(range(len(wa)))  # AdamW state of the adapters only

    # `mhpo eval RUN_DIR`: the run's base (its warm-up) + the adapters give the after-RL completions
    ev = mhpo_cli("eval", str(run), "eval.pass_k=0", timeout=600)
    assert ev.returncode == 0, ev.stderr
    after = [e for e in jsonl(run / "evals.jsonl") if e["stage"] == "after"][0]
    record = json.loads((run / "eval" / f"{final}.json").read_text())
    assert record["results"]["greedy/accuracy"] == after["greedy/accuracy"]
    ours = [s["completion"] for s in jsonl(run / "eval" / f"{final}.samples.jsonl")]
    trained = [s["completion"] for s in jsonl(run / "samples" / f"{final}.jsonl")]
    untrained = [s["completion"] for s in jsonl(run / "samples" / "step_000000.jsonl")]
    assert ours == trained and ours != untrained


def test_merge_writes_a_plain_final_model(tmp_path):
    run = tmp_path / "run"
    done = mhpo_cli(
        "train", "--output-dir", str(run), "--steps", "2", *RUN, "model.lora.merge=true", f"warmup.cache_dir={tmp_path}"
    )
    assert done.returncode == 0, done.stderr
    final = run / "checkpoints" / "step_000002"
    assert read_state(final)["kind"] == "model"
    assert (final / "model.safetensors").is_file() and not (final / ADAPTER_WEIGHTS).exists()
    keys = load_file(str(final / "model.safetensors")).keys()
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    ev = mhpo_cli("eval", str(run), "eval.pass_k=0", timeout=600)
    assert ev.returncode == 0, ev.stderr
    ours = [s["completion"] for s in jsonl(run / "eval" / "step_000002.samples.jsonl")]
    trained = [s["completion"] for s in jsonl(run / "samples" / "step_000002.jsonl")]
    assert ours == trained


def test_decode_on_a_peft_model_without_the_unwrap_would_not_see_hidden_states():
    """Why decode and log-probs go through models.logprobs.decoder: a peft model's ``.model`` is the
    whole causal LM (logits, no last_hidden_state)."""
    _, pol = _policy("model.lora.rank=4")
    wrapped = getattr(pol.model, pol.model.base_model_prefix)
    assert type(wrapped).__name__.endswith("ForCausalLM")
    assert type(decoder(pol.model)).__name__ == "Qwen2Model"
    assert decoder(copy.deepcopy(pol.model).merge_and_unload()).__class__.__name__ == "Qwen2Model"
