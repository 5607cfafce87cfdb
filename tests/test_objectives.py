"""Every objective's gradient is exactly the published one (float64), and the loss aggregates right."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_math as ref
from mhpo import AGG_MODES, OBJECTIVES, global_counts, policy_loss

NAMES = list(OBJECTIVES)
SEQUENCE_LEVEL = {"gspo", "gspo-token", "gmpo"}
# objectives with a stop-gradient inside the value: finite differences of the plain loss differ
# from the surrogate gradient by design, so those are checked against a frozen-sg surrogate
STOP_GRADIENT = {"mhpo", "mhpo-dhp-only", "mhpo-symmetric", "mhpo-rescaled", "cispo", "gspo-token"}

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def random_batch(seed: int, *, extreme: bool = True, per_token_adv: bool = False):
    """Random [B, T] inputs: log-ratios spanning 1e-30..1e30, masks with empty rows, mixed signs."""
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 7, (1,), generator=g))
    T = int(torch.randint(1, 10, (1,), generator=g))
    near = (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2  # r in ~[0.55, 1.8]
    far = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1) * math.log(1e30)
    pick_far = torch.rand(B, T, generator=g) < (0.35 if extreme else 0.0)
    lr = torch.where(pick_far, far, near)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 2 - 3
    logp = old + lr
    mask = torch.rand(B, T, generator=g) < 0.75
    if B > 1:
        mask[int(torch.randint(0, B, (1,), generator=g))] = False  # an empty row
    shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


def autograd_grad(name, logp, old, adv, mask, **kw):
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(name, x, old, adv, mask, stats=False, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), agg=st.sampled_from(AGG_MODES), per_token=st.booleans())
def test_autograd_gradient_equals_analytic_multiplier(name, seed, agg, per_token):
    logp, old, adv, mask = random_batch(seed, per_token_adv=per_token)
    loss, grad = autograd_grad(name, logp, old, adv, mask, agg=agg)
    hp = OBJECTIVES[name].defaults
    lr = torch.where(mask, logp - old, 0.0)
    a = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(lr)
    m = mask.double()
    w = ref.weights(m, agg)
    expected_grad = -ref.grad_J(name, lr, a, m, w, hp)
    expected_loss = -(w * ref.value(name, logp, lr, a, m, hp)).sum()
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-9, atol=1e-12)
    assert torch.all(grad[~mask] == 0)


def _frozen_surrogate(name, logp, old, adv, mask, agg):
    """J(logp) with every stop-gradient term frozen at the base point: its derivative is the gradient."""
    hp = OBJECTIVES[name].defaults
    m = mask.double()
    w = ref.weights(m, agg)
    a = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(logp)
    lr0 = torch.where(mask, logp - old, 0.0)
    if name == "cispo":
        coef = torch.exp(lr0).clamp(hp["floor"], hp["cap"])
        return lambda x: (w * coef * a * x).sum()
    if name == "gspo-token":
        s0 = torch.exp((lr0 * m).sum(-1, keepdim=True) / ref.seq_len(m).unsqueeze(-1))  # sg(s_i)

        def J(x):
            s = s0 * torch.exp(x - logp)  # s_it = sg(s_i) * exp(logp_it - sg logp_it)
            bound = s.clamp(1 - hp["eps_low"], 1 + hp["eps_high"])
            return (w * torch.minimum(s * a, bound * a)).sum()

        return J
    kw = {k: hp[k] for k in ("c", "k_pos", "lambda_pos", "k_neg", "lambda_neg")}
    lfm, dhp = hp.get("lfm", True), hp.get("dhp", True)
    _, zeta0, _, _ = ref.mhpo_parts(lr0, lfm=lfm, dhp=dhp, **kw)
    scale = 1.0
    if name == "mhpo-rescaled":
        scale = math.exp((ref.LN2 / kw["lambda_pos"]) ** kw["k_pos"] + (ref.LN2 / kw["lambda_neg"]) ** kw["k_neg"])

    def J(x):
        lr = torch.where(mask, x - old, 0.0)
        psi = kw["c"] * torch.tanh(lr / kw["c"]) if lfm else lr
        return (w * scale * torch.exp(psi - zeta0) * a).sum()

    return J


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_finite_differences_agree(name, seed):
    logp, old, adv, mask = random_batch(1000 + seed, extreme=False)
    agg = AGG_MODES[seed % 3]
    _, grad = autograd_grad(name, logp, old, adv, mask, agg=agg)
    if name in STOP_GRADIENT:
        J = _frozen_surrogate(name, logp, old, adv, mask, agg)
    else:
        J = lambda x: -policy_loss(name, x, old, adv, mask, agg=agg, stats=False)[0]  # noqa: E731
    h = 1e-6
    fd = torch.zeros_like(logp)
    for idx in range(logp.numel()):
        e = torch.zeros(logp.numel(), dtype=torch.float64)
        e[idx] = h
        e = e.view_as(logp)
        fd.view(-1)[idx] = (J(logp + e) - J(logp - e)) / (2 * h)
    torch.testing.assert_close(-grad, fd, rtol=1e-5, atol=1e-7)


def test_stop_gradient_objectives_differ_from_naive_finite_differences():
    """The sg in MHPO matters: the gradient is not the derivative of the plain objective value."""
    logp, old, adv, mask = random_batch(7, extreme=False)
    mask[:] = True
    _, grad = autograd_grad("mhpo", logp, old, adv, mask)
    J = lambda x: -policy_loss("mhpo", x, old, adv, mask, stats=False)[0]  # noqa: E731
    e = torch.zeros_like(logp)
    e[0, 0] = 1e-6
    fd = (J(logp + e) - J(logp - e)) / 2e-6
    assert abs(float(fd) + float(grad[0, 0])) > 1e-4 * abs(float(grad[0, 0]))


# ---------------------------------------------------------------------------------------------
# MHPO facts from the reference sheet

TABLE = {  # r: (exp(psi - zeta), M(r)) at the paper defaults, rounded to 3 decimals
    0.5: (0.067, 0.054),
    0.8: (0.183, 0.179),
    1.0: (0.265, 0.265),
    1.2: (0.335, 0.330),
    2.0: (0.480, 0.391),
    4.0: (0.516, 0.242),
    100.0: (0.459, 0.004),
}


def mhpo_weight_and_multiplier(r: float, name="mhpo", **hp):
    logp = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros_like(logp)
    loss, _ = policy_loss(
        name, logp, old, torch.ones(1, dtype=torch.float64), torch.ones_like(old, dtype=torch.bool), stats=False, **hp
    )
    (g,) = torch.autograd.grad(loss, logp)
    return -float(loss.detach()), -float(g)  # weight = j / A, M = dJ/dlogp / A


@pytest.mark.parametrize("r", list(TABLE))
def test_mhpo_reproduces_reference_table(r):
    weight, mult = mhpo_weight_and_multiplier(r)
    assert weight == pytest.approx(TABLE[r][0], abs=5e-4)
    assert mult == pytest.approx(TABLE[r][1], abs=5e-4)


def test_mhpo_on_policy_weight_is_0265_not_1():
    weight, mult = mhpo_weight_and_multiplier(1.0)
    expected = math.exp(-((math.log(2) / 1.0) ** 1.5) - (math.log(2) / 0.8) ** 2)
    assert weight == pytest.approx(expected, rel=1e-12) and mult == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.265, abs=5e-4)
    w, m = mhpo_weight_and_multiplier(1.0, name="mhpo-rescaled")
    assert w == pytest.approx(1.0, rel=1e-12) and m == pytest.approx(1.0, rel=1e-12)


def library_multiplier(lr: torch.Tensor, name: str = "mhpo", **hp) -> torch.Tensor:
    """M(r) = (dJ/dlogp)/A from autograd on one-token rows with A = 1 and unit weights; lr [N]."""
    logp = lr.unsqueeze(-1).clone().requires_grad_(True)
    ones = torch.ones(len(lr), dtype=lr.dtype)
    loss, _ = policy_loss(
        name,
        logp,
        torch.zeros_like(logp),
        ones,
        torch.ones_like(logp, dtype=torch.bool),
        num_tokens=1.0,
        stats=False,
        **hp,
    )
    (g,) = torch.autograd.grad(loss, logp)
    return -g.squeeze(-1)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    c=st.floats(0.05, 8.0),
    k_pos=st.floats(0.2, 4.0),
    lambda_pos=st.floats(0.1, 4.0),
    k_neg=st.floats(0.2, 4.0),
    lambda_neg=st.floats(0.1, 4.0),
)
def test_mhpo_multiplier_bounded_by_exp_c(c, k_pos, lambda_pos, k_neg, lambda_neg):
    lr = torch.linspace(-math.log(1e30), math.log(1e30), 4001, dtype=torch.float64)
    M = library_multiplier(lr, c=c, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg)
    assert torch.all(M >= 0) and torch.all(M <= math.exp(c))


def test_mhpo_default_multiplier_peak_is_about_039():
    """Theorem 1 gives e^c = 4.48; with the defaults the true peak is far lower: 0.396 near r = 1.8."""
    lr = torch.linspace(math.log(0.01), math.log(100), 200001, dtype=torch.float64)
    M = library_multiplier(lr)
    _, _, _, m_ref = ref.mhpo_parts(lr)
    torch.testing.assert_close(M, m_ref, rtol=1e-12, atol=1e-15)
    peak = int(M.argmax())
    assert float(M[peak]) == pytest.approx(0.3958, abs=1e-4)
    assert 1.5 < math.exp(float(lr[peak])) < 2.2


def test_zeta_carries_no_gradient():
    from mhpo.objectives.mhpo_formula import dhp, lfm

    lr = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    zeta = dhp(lfm(lr, 1.5), 1.5, 1.0, 2.0, 0.8)
    assert not zeta.requires_grad
    psi, z_ref, _, _ = ref.mhpo_parts(lr.detach())
    torch.testing.assert_close(zeta, z_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", range(10))
def test_mhpo_without_lfm_and_dhp_is_reinforce(seed):
    logp, old, adv, mask = random_batch(seed)
    for agg in AGG_MODES:
        l1, g1 = autograd_grad("mhpo", logp, old, adv, mask, agg=agg, lfm=False, dhp=False)
        l2, g2 = autograd_grad("reinforce", logp, old, adv, mask, agg=agg)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_ablations_are_the_switches():
    logp, old, adv, mask = random_batch(3)
    pairs = [
        ("mhpo-lfm-only", {"dhp": False}),
        ("mhpo-dhp-only", {"lfm": False}),
        ("mhpo-symmetric", {"k_neg": 1.5, "lambda_neg": 1.0}),
    ]
    for name, hp in pairs:
        l1, g1 = autograd_grad(name, logp, old, adv, mask)
        l2, g2 = autograd_grad("mhpo", logp, old, adv, mask, **hp)
        torch.testing.assert_close(l1, l2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert OBJECTIVES["mhpo"].defaults["lfm"] and OBJECTIVES["mhpo"].defaults["dhp"]


# ---------------------------------------------------------------------------------------------
# Micro-batches with global normalisers give the full-batch gradient


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_sum_to_full_batch_gradient(name, agg):
    g = torch.Generator().manual_seed(11)
    B, T = 12, 9
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    ref_lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty row
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    kw = dict(agg=agg, ref_logp=ref_lp, beta=0.04, norm_length=T)

    full_loss, full_grad = autograd_grad(name, logp, old, adv, mask, **kw)
    counts = global_counts(mask)
    x = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in torch.tensor_split(torch.randperm(B, generator=g), 4):
        width = max(int(lengths[rows].max()), 1)  # each micro-batch trims its own padding
        sl = (rows, slice(0, width))
        loss, _ = policy_loss(
            name,
            x[sl],
            old[sl],
            adv[rows],
            mask[sl],
            ref_logp=ref_lp[sl],
            agg=agg,
            beta=0.04,
            norm_length=T,
            stats=False,
            **counts,
        )
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(x.grad, full_grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(total, full_loss, rtol=1e-12, atol=1e-15)


def test_kl_term_value_and_gradient():
    logp, old, adv, mask = random_batch(5, extreme=False)
    refp = old + 0.3 * torch.randn_like(old)
    beta = 0.1
    l_kl, g_kl = autograd_grad("grpo", logp, old, adv, mask, ref_logp=refp, beta=beta)
    l0, g0 = autograd_grad("grpo", logp, old, adv, mask)
    w = ref.weights(mask.double(), "token-mean")
    torch.testing.assert_close(l_kl - l0, beta * (w * ref.k3(logp, refp)).sum(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_kl - g0, beta * w * (1 - torch.exp(refp - logp)), rtol=1e-10, atol=1e-14)


def test_aggregation_modes_weight_sequences_as_documented():
    """Two rows of length 1 and 3, objective j = A (reinforce at r = 1): the three modes differ."""
    logp = torch.zeros(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def loss(agg, **kw):
        return -float(policy_loss("reinforce", logp, logp, adv, mask, agg=agg, stats=False, **kw)[0])

    assert loss("token-mean") == pytest.approx((1 + 3 * 2) / 4)
    assert loss("seq-mean-token-mean") == pytest.approx((1 + 2) / 2)
    assert loss("seq-mean-token-sum-norm") == pytest.approx((1 / 4 + 6 / 4) / 2)
    assert loss("seq-mean-token-sum-norm", norm_length=10) == pytest.approx((1 / 10 + 6 / 10) / 2)
    assert loss("token-mean", num_tokens=8) == pytest.approx(7 / 8)
    assert loss("seq-mean-token-mean", num_seqs=4) == pytest.approx(3 / 4)


def test_sapo_temperatures_are_exact_in_float64():
    """tau_neg = 1.05 must not pass through float32 (it would become 1.0499999523)."""
    logp = torch.zeros(1, 1, dtype=torch.float64)
    old = torch.full_like(logp, -0.5)
    loss, _ = policy_loss(
        "sapo",
        logp,
        old,
        torch.tensor([-1.0], dtype=torch.float64),
        torch.ones_like(logp, dtype=torch.bool),
        stats=False,
    )
    r, tau = math.exp(0.5), 1.05
    expected = 1.0 / (1.0 + math.exp(-tau * (r - 1))) * 4 / tau  # loss = -(-1) * f(r)
    assert float(loss) == pytest.approx(expected, rel=1e-15, abs=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_token_losses_aggregate_to_policy_loss(name, impl):
    from mhpo import token_losses, token_weights

    logp, old, adv, mask = random_batch(21, per_token_adv=True)
    refp = old + 0.2
    for agg in AGG_MODES:
        x1 = logp.clone().requires_grad_(True)
        loss, stats = policy_loss(name, x1, old, adv, mask, agg=agg, ref_logp=refp, beta=0.03, impl=impl)
        loss.backward()
        x2 = logp.clone().requires_grad_(True)
        t = token_losses(name, x2, old, adv, mask, ref_logp=refp, stats=True, impl=impl)
        assert torch.all(t.policy[~mask] == 0) and torch.all(t.kl[~mask] == 0)
        total = ((t.policy + 0.03 * t.kl) * token_weights(mask.double(), agg)).sum()
        total.backward()
        torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-14)
        assert t.stats == {k: v for k, v in stats.items() if k != "loss"}
