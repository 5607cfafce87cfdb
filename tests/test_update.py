"""The policy update: micro-batches (split by completion length) sum to the minibatch gradient;
ratios start at 1."""

from __future__ import annotations

import copy

import pytest
import torch

from mhpo.generation.prompts import PromptEncoder, eos_token_ids
from mhpo.generation.rollout import sample
from mhpo.models.tiny import build_tiny
from mhpo.tasks import Example
from mhpo.trainer import update as update_module
from mhpo.trainer.config import ObjectiveConfig, TinyModelConfig, UpdateConfig
from mhpo.trainer.update import UpdateBatch, policy_update, rollout_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup():
    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=64), seed=0)
    prompts = PromptEncoder(tok, chat=False)([Example("12+3=", ""), Example("7+88=", ""), Example("1+1=", "")])
    torch.manual_seed(0)
    r = sample(model, tok, prompts, group_size=4, max_new_tokens=5, eos_ids=eos_token_ids(model, tok))
    old, _ = rollout_logprobs(model, r, temperature=1.0)
    adv = torch.linspace(-1.5, 1.5, len(r))
    return model, UpdateBatch(r, old, adv, norm_length=5.0)


def _grads(model, batch, micro, objective, agg, tokens=None, widths=None):
    """(gradients, stats) of one optimizer step on a copy of ``model``; ``widths`` (a list) collects
    the input width of every call of the copy's decoder (model.model)."""
    model = copy.deepcopy(model)
    if widths is not None:
        model.model.register_forward_pre_hook(
            lambda _, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
        )
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    opt = Capture(model.parameters(), lr=0.0)
    update = UpdateConfig(
        num_minibatches=1, epochs=1, micro_batch_size=micro, micro_batch_tokens=tokens, max_grad_norm=1e9
    )
    stats = policy_update(model, opt, batch, ObjectiveConfig(name=objective, agg=agg), update).stats
    return captured, stats


def test_micro_batches_give_the_full_minibatch_gradient(monkeypatch):
    model, batch = _setup()
    P = batch.rollout.prompt_width
    for objective, agg in (
        ("mhpo", "token-mean"),
        ("grpo", "seq-mean-token-mean"),
        ("mhpo", "seq-mean-token-sum-norm"),
    ):
        with monkeypatch.context() as m:  # the reference: one forward over the whole minibatch
            m.setattr(update_module, "micro_batches", lambda rollout, mb, *limits: [torch.arange(len(mb))])
            m.setattr(update_module, "minibatch_prompts", lambda model, rollout: None)
            full, s_full = _grads(model, batch, None, objective, agg)
        # split by length (automatic), at most 5 rows each: the minibatch's prompts run once, before
        # the micro-batches; at most 20 positions each: every micro-batch runs its own prompts
        for size, tokens in ((None, None), (5, None), (None, 20)):
            widths: list[int] = []
            micro, s_micro = _grads(model, batch, size, objective, agg, tokens, widths)
            if tokens is None:
                least = -(-len(batch.rollout) // (size or len(batch.rollout)))  # micro-batches on top of it
                assert widths.count(P - 1) == 1 and len(widths) >= 1 + least, widths  # one pass over 0 .. P-2
            else:
                assert len(widths) >= 2 * 2 and widths.count(P - 1) > 1, widths  # prompts, rest; per micro-batch
            assert full.keys() == micro.keys() and full
            for name in full:
                assert torch.allclose(full[name], micro[name], atol=1e-6, rtol=1e-4), (objective, agg, name)
            assert abs(s_full["policy/loss"] - s_micro["policy/loss"]) < 1e-5
        # a fresh batch: the behaviour policy is the current one, so r = 1 on the first step
        assert abs(s_full["policy/ratio/mean"] - 1.0) < 1e-5


def test_micro_batches_group_rows_by_length():
    """Every row once, at most max_rows per micro-batch, and fewer padded positions than one batch
    when lengths spread (rows of 5 to 64 tokens); equal lengths stay one micro-batch."""
    from mhpo.generation.rollout import Rollout

    def rollout(lengths, P=6):
        m, C = len(lengths), 64
        prompts = torch.arange(m // 2).repeat_interleave(2)[:, None].expand(m, P)  # groups of 2
        cmask = torch.arange(C)[None] < torch.tensor(lengths)[:, None]
        ids = torch.cat([prompts, torch.zeros(m, C, dtype=torch.long)], 1)
        return Rollout(ids, torch.ones_like(ids), cmask, P)

    spread = [64, 5, 64, 9, 33, 12, 64, 7, 20, 40, 6, 64, 10, 8, 50, 11]
    r, mb = rollout(spread), torch.arange(16)
    for cap in (None, 3):
        parts = update_module.micro_batches(r, mb, cap)
        assert sorted(torch.cat(parts).tolist()) == list(range(16))
        assert cap is None or max(len(p) for p in parts) <= cap
    parts = update_module.micro_batches(r, mb, None)
    lengths = torch.tensor(spread)
    padded = sum(len(p) * int(lengths[p].max()) for p in parts)
    assert len(parts) > 1 and padded < 0.7 * 16 * 64
    assert len(update_module.micro_batches(rollout([30] * 16), mb, None)) == 1


def test_micro_batch_tokens_bound_the_positions_of_each_forward():
    """With micro_batch_tokens every micro-batch runs at most that many positions (rows x longest
    completion + distinct prompts x prompt width), a row longer than the bound alone; rows of equal
    length are cut between prompt groups, so no prompt runs twice where a cut can avoid it."""
    from mhpo.generation.rollout import Rollout

    P, C = 6, 64

    def rollout(lengths, group=2):
        m = len(lengths)
        prompts = torch.arange(m).div(group, rounding_mode="floor").flip(0)[:, None].expand(m, P)
        cmask = torch.arange(C)[None] < torch.tensor(lengths)[:, None]
        ids = torch.cat([prompts, torch.zeros(m, C, dtype=torch.long)], 1)
        return Rollout(ids, torch.ones_like(ids), cmask, P)

    def positions(r, rows):
        distinct = len(torch.unique(r.input_ids[rows, :P], dim=0))
        return len(rows) * int(r.completion_mask[rows].sum(-1).max()) + distinct * P

    spread = [64, 5, 64, 9, 33, 12, 64, 7, 20, 40, 6, 64, 10, 8, 50, 11]
    mb = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for budget in (70, 100, 200, 500):
        r = rollout(spread)
        parts = update_module.micro_batches(r, mb, None, budget)
        assert sorted(torch.cat(parts).tolist()) == list(range(16))
        for p in parts:
            assert positions(r, mb[p]) <= budget or len(p) == 1, (budget, p)
    assert [len(p) for p in update_module.micro_batches(rollout(spread), mb, None, 10)] == [1] * 16

    # 16 rows of 64 tokens in 4 groups of 4, shuffled: 140 positions hold 2 rows of one prompt; 270 one group
    equal = rollout([C] * 16, group=4)
    for budget, size in ((140, 2), (270, 4)):
        parts = update_module.micro_batches(equal, mb, None, budget)
        assert [len(p) for p in parts] == [size] * (16 // size)
        assert all(len(torch.unique(equal.input_ids[mb[p], :P], dim=0)) == 1 for p in parts)
    assert len(update_module.micro_batches(equal, mb, None, None)) == 1


def test_second_minibatch_sees_ratios_away_from_one():
    model, batch = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    update = UpdateConfig(num_minibatches=2, epochs=1, max_grad_norm=1.0)
    stats = policy_update(model, opt, batch, ObjectiveConfig(name="mhpo", agg="token-mean"), update).stats
    assert stats["update/optimizer_steps"] == 2
    assert stats["policy/ratio/max"] > 1.0 + 1e-4 or stats["policy/ratio/min"] < 1.0 - 1e-4
    assert stats["grad_norm"] > 0
    for key in ("policy/clip_frac", "policy/multiplier/mean", "policy/mhpo/psi_mean", "policy/loss"):
        assert key in stats


def test_group_ordered_minibatches_keep_each_group_whole():
    groups = torch.arange(6).repeat_interleave(4)[torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20, 21])]
    # rows of groups 0, 2, 3 (whole) and 5 (two rows left), as kept rows after a filter
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        parts = update_module.minibatches(len(groups), 3, groups)
        rows = torch.cat(parts)
        assert sorted(rows.tolist()) == list(range(len(groups)))  # every row exactly once
        assert [len(torch.unique(groups[p])) for p in parts] == [2, 1, 1]  # 4 groups in 3 near-equal parts
        for p in parts:  # a group's rows all in one part
            assert all(int((groups[p] == g).sum()) == int((groups == g).sum()) for g in torch.unique(groups[p]))
        seen.add(tuple(tuple(groups[p].unique().tolist()) for p in parts))
    assert len(seen) > 3  # the groups' order is drawn, not fixed
    torch.manual_seed(0)
    first = update_module.minibatches(len(groups), 3, groups)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, update_module.minibatches(len(groups), 3, groups)))
    torch.manual_seed(0)
    assert len(update_module.minibatches(len(groups), 9, groups)) == 4  # at most one part per group
    assert update_module.minibatches(0, 2, groups[:0]) == []


def test_group_ordered_minibatches_run_each_prompt_once_per_epoch(monkeypatch):
    """With whole groups per minibatch, each of the 3 prompts' prefix passes runs once in an epoch of
    2 minibatches (shuffled rows put most prompts in both); the update needs the groups."""
    model, batch = _setup()
    G = 4
    prompt_rows = []
    real = update_module.minibatch_prompts

    def spy(model, whole, *args, **kwargs):
        prompt_rows.append(len(torch.unique(whole.input_ids[:, : whole.prompt_width], dim=0)))
        return real(model, whole, *args, **kwargs)

    monkeypatch.setattr(update_module, "minibatch_prompts", spy)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    objective = ObjectiveConfig(name="mhpo", agg="token-mean")
    update = UpdateConfig(num_minibatches=2, epochs=2, max_grad_norm=1.0, minibatch_order="groups")
    with pytest.raises(ValueError, match="minibatch_order=groups needs UpdateBatch.groups"):
        policy_update(model, opt, batch, objective, update)
    batch.groups = torch.arange(len(batch.rollout)) // G
    torch.manual_seed(0)
    stats = policy_update(model, opt, batch, objective, update).stats
    assert stats["update/optimizer_steps"] == 4
    assert len(prompt_rows) == 4 and sorted(prompt_rows) == [1, 1, 2, 2]  # 3 prompts per epoch, each once


@pytest.mark.parametrize("behaviour", ["trainer", "sampler"])
def test_a_trainer_step_with_group_ordered_minibatches_trains_whole_groups(monkeypatch, behaviour):
    """rl_step with update.minibatch_order=groups and zero-std groups dropped: the minibatches (drawn
    with the behaviour log-probs for the trainer's, in the update for the sampler's) keep every kept
    group whole."""
    from collections import deque

    from mhpo.trainer import step as step_module
    from mhpo.trainer.config import load_config
    from mhpo.trainer.setup import build_policy, model_loader, prepare_run

    drawn, batches = [], []
    real_minibatches, real_update = update_module.minibatches, step_module.policy_update

    def spy_minibatches(n, num, groups=None):
        parts = real_minibatches(n, num, groups)
        drawn.append((groups, parts))
        return parts

    def spy_update(model, optimizer, batch, objective_cfg, update_cfg):
        batches.append((batch.groups, len(batch.rollout)))
        return real_update(model, optimizer, batch, objective_cfg, update_cfg)

    monkeypatch.setattr(step_module, "minibatches", spy_minibatches)
    monkeypatch.setattr(update_module, "minibatches", spy_minibatches)
    monkeypatch.setattr(step_module, "policy_update", spy_update)
    coin = torch.Generator().manual_seed(1)
    advantages = step_module.group_advantages  # the untrained model scores 0: draw 0/1 rewards instead

    def drawn_rewards(rewards, *args):
        return advantages(torch.randint(0, 2, rewards.shape, generator=coin).float(), *args)

    monkeypatch.setattr(step_module, "group_advantages", drawn_rewards)
    overrides = ["warmup.enabled=off", "train.steps=2", "train.report_to=[]", "eval.size=0"]
    overrides += ["rollout.prompts_per_step=6", "rollout.group_size=4", "update.num_minibatches=2"]
    overrides += ["advantage.drop_zero_std=true", "update.minibatch_order=groups"]
    overrides += [f"rollout.behaviour_logprobs={behaviour}"]
    with prepare_run(load_config(None, overrides)) as plan:
        pol = build_policy(plan.cfg, model_loader(plan.cfg), "tiny", "tiny")
        source = plan.task.train_source(0, frozenset())
        torch.manual_seed(0)
        pending = deque()
        for step in (1, 2):
            step_module.rl_step(plan, pol, source, pending, step)
    assert len(batches) == 2 and len(drawn) == 2
    for (groups, n), (drawn_groups, parts) in zip(batches, drawn):
        assert torch.equal(groups, drawn_groups)
        assert len(groups) == n and n % 4 == 0 and 4 <= n < 24  # kept rows: whole groups of 4, some dropped
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        for part in parts:
            assert all(int((groups[part] == g).sum()) == 4 for g in torch.unique(groups[part]))
