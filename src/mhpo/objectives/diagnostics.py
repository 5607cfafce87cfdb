"""Detached diagnostics of one objective evaluation, over the n masked-in tokens only.

    ratio/{mean,min,max}          r = exp(log r)
    ratio/{p1,p99}                exp of the 1st / 99th percentile of log r (sampled, see below)
    log_ratio/abs_mean, abs_p99   mean and (sampled) 99th percentile of |log r|
    clip_frac                     fraction of tokens with M(r) < 0.1 * M(1): gradient zeroed or
                                  damped below 10% of its on-policy value (generalised clip fraction)
    multiplier/mean               mean M(r) = (dJ/dlogp) / A
    mhpo/{psi,zeta,survival}_mean for the MHPO family (survival = exp(-zeta))
    kl                            mean k3 to the reference, when one is given

Means, min / max and the clip count are exact: :class:`ChunkStats` reduces the flattened [B, T]
tensors in cache-sized chunks (inside the fused MHPO kernel, while its chunk is in cache; see
:mod:`mhpo.objectives.mhpo_fused`), float32 sums per chunk accumulated in float64.

The percentiles are nearest-rank quantiles of a deterministic sample of the masked log r:

    q-quantile of s values  = the k-th smallest,  k = 1 + round(q (s - 1))
    sample                  = the masked tokens at positions 0, d, 2d, ... of the flattened [B, T]
    d                       = ceil(n / SAMPLE), raised until coprime to T (the walk crosses columns)

so s ~ n / d tokens: all n (exact) when n <= SAMPLE; else about SAMPLE at most and, where d is
raised by at most 1 (any power-of-two T), SAMPLE / 3 at least. One standard deviation of the
estimate's rank, sqrt(q (1 - q) / s), is then under 0.1 percentile at q = 0.01 or 0.99; a test
holds the rank error under 0.5 percentile on 1M heavy-tailed tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

DAMPED = 0.1  # a token counts as clipped when its multiplier is below this share of M(1)
CHUNK = 1 << 18  # tokens per chunk on CPU (an accelerator takes the whole tensor at once)
SAMPLE = 1 << 15  # masked tokens in the percentile sample (at most about this many)
Q_LOW, Q_HIGH = 0.01, 0.99
_MHPO = ("psi", "zeta", "survival")
_ORDER_KEYS = ("ratio/min", "ratio/max", "ratio/p1", "ratio/p99", "log_ratio/abs_p99")
_KEYS = ("ratio/mean", "log_ratio/abs_mean", "clip_frac", "multiplier/mean", *_ORDER_KEYS)


def nearest_rank(q: float, n: int) -> int:
    """1-based rank of the nearest-rank q-quantile of n values: 1 + round(q (n - 1))."""
    return 1 + round(q * (n - 1))


def quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank q-quantiles of the values of a 1-D tensor (exact over x; 0.0 when x is empty)."""
    return [kth_smallest(x, nearest_rank(q, x.numel())) if x.numel() else 0.0 for q in qs]


def kth_smallest(x: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of a 1-D tensor: the largest of its k smallest or the smallest of
    its n - k + 1 largest, whichever end is nearer (a top-k: ~2x kthvalue, ~10x a sort on CPU)."""
    n = x.numel()
    if k <= n - k + 1:
        return float(x.topk(k, largest=False, sorted=False).values.max())
    return float(x.topk(n - k + 1, sorted=False).values.min())


def count(mask: torch.Tensor) -> int:
    """True entries of a bool tensor (numpy's count on CPU: several times faster than torch's)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.numpy()))
    return int(torch.count_nonzero(mask))


def _exp(v: float) -> float:
    """exp in float64, capped at e^700 (finite)."""
    return math.exp(min(v, 700.0))


def sample_positions(numel: int, width: int, n: int) -> slice:
    """Every d-th position of a flattened [*, width] tensor holding n masked tokens, d = ceil(n / SAMPLE)
    raised until coprime to the width: about min(n, SAMPLE) of them are masked; d = 1 for n <= SAMPLE."""
    stride = max(-(-n // SAMPLE), 1)
    while stride > 1 and math.gcd(stride, max(width, 1)) != 1:
        stride += 1
    return slice(0, numel, stride)


def log_ratio_sample(
    values_at: Callable[[slice | torch.Tensor], torch.Tensor], mask: torch.Tensor, n: int
) -> torch.Tensor:
    """The masked log r at :func:`sample_positions` (1-D); ``values_at(index)`` gives the log r at an
    index (slice or index tensor) of the flattened [B, T] layout, ``mask`` is [B, T] bool with n True.

    A mask periodic with the stride (e.g. every other token) can put far fewer or more than
    min(n, SAMPLE) masked tokens at those positions; then it is every d-th masked token instead
    (d = ceil(n / SAMPLE): at most SAMPLE of them)."""
    width = mask.shape[-1] if mask.dim() else 1
    flat = mask.reshape(-1)
    pos = sample_positions(flat.numel(), width, n)
    sample = values_at(pos)[flat[pos]]
    if not min(n, SAMPLE) <= 4 * sample.numel() <= 8 * SAMPLE:
        idx = flat.nonzero().squeeze(1)  # [n]
        sample = values_at(idx[:: max(-(-n // SAMPLE), 1)])
    return sample


def masked_extrema(x: torch.Tensor, mf: torch.Tensor, fill: float, out: torch.Tensor) -> tuple[float, float]:
    """(min, max) of x where mf = 1, with masked-out positions read as ``fill`` (a masked value):

        fill * (1 - mf) + x * mf   exact in floating point for mf in {0, 1}

    x, mf, out: [n] of one dtype (out a scratch). ~3x faster than torch.where(mask, x, fill) on CPU."""
    y = torch.mul(mf, -fill, out=out).add_(fill).addcmul_(x, mf)  # 0 or fill, exactly; then + x * mf
    lo, hi = torch.aminmax(y)
    return float(lo), float(hi)


class ChunkStats:
    """objective_stats accumulated chunk by chunk over flattened [B, T] tensors.

    Per chunk [s, e): ``tokens(s, e, dtype)`` first, then any of ``log_ratio(x)``,
    ``multiplier(m)``, ``mean(key, x)``, ``zeta(u, a)`` with that chunk's values (1-D, contiguous,
    of that dtype; they are only read); ``result()`` at the end.

    mask      [B, T] bool
    clip_thr  0.1 * M(1): a 0-d tensor, or [B, T] / broadcastable (per advantage sign)
    sample    masked log r at the sample (1-D, :func:`log_ratio_sample`), for the percentiles
    m_scale   reported M = m_scale * the kernel's M (mhpo-rescaled)
    keys      mean keys to report even when no chunk gave them
    n         masked tokens (counted when None)
    """

    def __init__(self, mask: torch.Tensor, clip_thr, sample: torch.Tensor, m_scale=1.0, keys=(), n=None):
        self.mask = mask.reshape(-1)
        self.n = count(mask) if n is None else n
        if torch.is_tensor(clip_thr):
            clip_thr = clip_thr.expand(mask.shape).reshape(-1) if clip_thr.numel() > 1 else clip_thr.reshape(())
        self.clip_thr = clip_thr
        self.sample = sample
        self.fill = float(sample[0]) if sample.numel() else None  # a masked log r, see masked_extrema
        self.m_scale = m_scale
        self.keys = tuple(keys)
        self.cpu = self.mask.device.type == "cpu"
        self.sums: dict[str, float] = {}
        self.lo, self.hi = math.inf, -math.inf  # min / max masked log r
        self.clipped = 0
        self._buf: dict[str, torch.Tensor] = {}  # chunk-sized scratch, reused across chunks
        self._s = self._e = 0

    def _scratch(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        size = self._e - self._s
        b = self._buf.get(name)
        if b is None or b.dtype != dtype or b.numel() < size:
            b = self._buf[name] = torch.empty(size, dtype=dtype, device=self.mask.device)
        return b[:size]

    # -- per chunk ---------------------------------------------------------------------------
    def tokens(self, s: int, e: int, dtype: torch.dtype) -> None:
        self._s, self._e = s, e
        self._m = self.mask[s:e]
        # bool -> float through uint8: ~5x faster than .to(float) on CPU
        self._mf = self._scratch("mf", dtype).copy_(self._m.view(torch.uint8))

    def _add(self, key: str, masked_sum: torch.Tensor | float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(masked_sum)

    def mean(self, key: str, x: torch.Tensor) -> None:
        """Add the masked sum of x to ``key`` (reported as sum / n)."""
        self._add(key, torch.dot(x, self._mf))

    def log_ratio(self, x: torch.Tensor) -> None:
        """Masked sums of r = exp(x) and |x|, and the masked min / max of x."""
        buf = self._scratch("a", x.dtype)
        ratio = float(torch.dot(torch.exp(x, out=buf), self._mf))
        if not math.isfinite(ratio):  # exp overflowed the compute dtype: this chunk in float64, r <= e^700
            ratio = float(torch.dot(x.double().clamp_(max=700.0).exp_(), self._mf.double()))
        self._add("ratio/mean", ratio)
        self._add("log_ratio/abs_mean", torch.dot(torch.abs(x, out=buf), self._mf))
        if self.fill is not None:
            lo, hi = masked_extrema(x, self._mf, self.fill, buf)
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def multiplier(self, m: torch.Tensor) -> None:
        """M mean and the clipped count (masked M < clip_thr)."""
        if self.m_scale != 1.0:
            m = m * self.m_scale
        self.mean("multiplier/mean", m)
        thr = self.clip_thr
        if torch.is_tensor(thr) and thr.dim():
            thr = thr[self._s : self._e]
        if self.cpu:  # numpy's bool kernels: ~50x faster than torch's on CPU
            b = np.less(m.numpy(), thr.numpy() if torch.is_tensor(thr) else thr)
            self.clipped += int(np.count_nonzero(np.logical_and(b, self._m.numpy(), out=b)))
        else:
            self.clipped += int(torch.count_nonzero(torch.lt(m, thr) & self._m))

    def multiplier_from(self, w: torch.Tensor, t2: torch.Tensor) -> None:
        """M = w * (1 - t2), as the fused kernel forms it (the same float operations)."""
        self.multiplier(torch.addcmul(w, w, t2, value=-1.0, out=self._scratch("a", w.dtype)))

    def zeta(self, u: torch.Tensor, a: float) -> None:
        """zeta = a * u and survival = exp(-zeta), from the fused kernel's u = zeta / a."""
        self._add("mhpo/zeta_mean", float(torch.dot(u, self._mf)) * a)
        self.mean("mhpo/survival_mean", torch.mul(u, -a, out=self._scratch("a", u.dtype)).exp_())

    def add_full(self, key: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        """Masked mean of a whole [B, T] tensor under ``key`` (e.g. the KL), chunk by chunk."""
        flat = t.detach().contiguous().reshape(-1).to(dtype)
        step = chunk_len(flat.device, flat.numel())
        for s in range(0, flat.numel(), step):
            self.tokens(s, min(s + step, flat.numel()), dtype)
            self.mean(key, flat[s : s + step])

    # -- result ------------------------------------------------------------------------------
    def result(self) -> dict[str, float]:
        n = self.n
        stats: dict[str, float] = {"tokens": float(n)}
        if n == 0:
            stats.update({k: 0.0 for k in (*_KEYS, *self.keys, *self.sums)})
            return stats
        stats.update({key: 0.0 for key in self.keys})
        stats.update({key: total / n for key, total in self.sums.items()})
        stats["clip_frac"] = self.clipped / n
        stats.update(order_stats(self.sample, self.lo, self.hi))
        return stats


def order_stats(sample: torch.Tensor, lo: float, hi: float) -> dict[str, float]:
    """ratio/{min,max} = exp(lo), exp(hi) and ratio/{p1,p99}, log_ratio/abs_p99 from the log r sample."""
    p1, p99 = quantiles(sample, (Q_LOW, Q_HIGH))
    (abs_p99,) = quantiles(sample.abs(), (Q_HIGH,))
    return {
        "ratio/min": _exp(lo),
        "ratio/max": _exp(hi),
        "ratio/p1": _exp(p1),
        "ratio/p99": _exp(p99),
        "log_ratio/abs_p99": abs_p99,
    }


def log_ratio_order_stats(values: torch.Tensor) -> dict[str, float]:
    """ratio/{min,max,p1,p99} and log_ratio/abs_p99 of the masked log r ``values`` (1-D), as
    objective_stats reports them for one batch (min / max exact, percentiles over every d-th value,
    d = ceil(n / SAMPLE)), here for several batches' tokens together."""
    n = values.numel()
    if n == 0:
        return dict.fromkeys(_ORDER_KEYS, 0.0)
    lo, hi = torch.aminmax(values)
    return order_stats(values[sample_positions(n, 1, n)], float(lo), float(hi))


def masked_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked log r (1-D) exactly as policy_loss forms it: half precision in float32."""
    dtype = torch.float32 if logp.dtype in (torch.float16, torch.bfloat16) else logp.dtype
    return (logp.detach().to(dtype) - old_logp.detach().to(dtype))[mask.bool()]


def chunk_len(device: torch.device, numel: int) -> int:
    return max(min(CHUNK if device.type == "cpu" else numel, numel), 1)


def make_chunk_stats(values_at, mask: torch.Tensor, clip_thr, m_scale: float = 1.0, keys=()) -> ChunkStats:
    """A ChunkStats over ``mask`` ([B, T] bool) whose percentile sample is read through
    ``values_at(index)``: the log r at an index of the flattened [B, T] (see :func:`log_ratio_sample`)."""
    n = count(mask)
    sample = log_ratio_sample(values_at, mask, n) if n else torch.zeros(0)
    return ChunkStats(mask, clip_thr, sample, m_scale, keys, n=n)


@torch.no_grad()
def objective_stats(
    log_r: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] bool
    multiplier: torch.Tensor,  # [B, T]
    on_policy_multiplier,  # M(1) for each token's advantage sign: a number, [B, T] or broadcastable ([B, 1])
    extras: Mapping[str, torch.Tensor],
    kl: torch.Tensor | None = None,  # [B, T]
) -> dict[str, float]:
    """The diagnostics of the module docstring from whole [B, T] tensors (the unfused objectives)."""
    lr = log_r.detach().contiguous().reshape(-1)
    flat = {f"mhpo/{k}_mean": extras[k].detach().contiguous().reshape(-1) for k in _MHPO if k in extras}
    if kl is not None:
        flat["kl"] = kl.detach().contiguous().reshape(-1)
    acc = make_chunk_stats(lr.__getitem__, mask, DAMPED * on_policy_multiplier, keys=flat)
    mult = multiplier.detach().contiguous().reshape(-1)
    step = chunk_len(lr.device, lr.numel())
    for s in range(0, lr.numel(), step):
        e = min(s + step, lr.numel())
        acc.tokens(s, e, lr.dtype)
        acc.log_ratio(lr[s:e])
        acc.multiplier(mult[s:e].to(lr.dtype))
        for key, t in flat.items():
            acc.mean(key, t[s:e].to(lr.dtype))
    return acc.result()
