"""Detached diagnostics of one objective evaluation, over masked-in tokens only.

    ratio/{mean,min,max,p1,p99}   r = exp(log r)  (percentiles: nearest rank)
    log_ratio/abs_mean, abs_p99   mean and 99th percentile of |log r|
    clip_frac                     fraction of tokens with M(r) < 0.1 * M(1): gradient zeroed or
                                  damped below 10% of its on-policy value (generalised clip fraction)
    multiplier/mean               mean M(r) = (dJ/dlogp) / A
    mhpo/{psi,zeta,survival}_mean for the MHPO family (survival = exp(-zeta))
    kl                            mean k3 to the reference, when one is given

How it stays cheap (:class:`ChunkStats`): the tensors are read in cache-sized chunks of the
flattened [B, T] layout (inside the fused MHPO kernel, while its chunk is still in cache; see
:mod:`mhpo.objectives.mhpo_fused`), means are float32 sums per chunk accumulated in float64, and
the percentiles are exact order statistics found without sorting or copying every token:

    1. a strided sample of the masked log r gives thresholds lo < hi with, very likely, more than
       1% + a margin of the tokens below lo and above hi;
    2. each chunk keeps only its masked tokens outside [lo, hi] (a few % of them);
    3. the k-th smallest log r is the k-th smallest kept value when at least k kept values are
       < lo (every token < lo was kept), and likewise for the top and for |log r|; when a check
       fails the statistic is computed from all masked tokens instead (exact either way).

The values are those of a float64 computation over the masked tokens up to float32 rounding of
the sums (relative ~1e-7); the percentiles and min / max are exactly the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

DAMPED = 0.1  # a token counts as clipped when its multiplier is below this share of M(1)
CHUNK = 1 << 18  # tokens per chunk on CPU (an accelerator takes the whole tensor at once)
SAMPLE = 1 << 15  # positions in the strided sample that sets the tail thresholds
MIN_SAMPLE = 512  # with fewer masked tokens in the sample, every masked token is kept
Q_LOW, Q_HIGH = 0.01, 0.99
_MHPO = ("psi", "zeta", "survival")
_KEYS = [
    "ratio/mean",
    "ratio/min",
    "ratio/max",
    "ratio/p1",
    "ratio/p99",
    "log_ratio/abs_mean",
    "log_ratio/abs_p99",
    "clip_frac",
    "multiplier/mean",
]


def nearest_rank(q: float, n: int) -> int:
    """1-based rank of the nearest-rank q-quantile of n values: 1 + round(q (n - 1))."""
    return 1 + round(q * (n - 1))


def masked_quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank quantiles of a 1-D tensor (exact; numpy's introselect on CPU, kthvalue elsewhere)."""
    n = x.numel()
    if n == 0:
        return [0.0 for _ in qs]
    ranks = [nearest_rank(q, n) for q in qs]
    if x.device.type == "cpu":
        part = np.partition(x.detach().numpy(), [r - 1 for r in ranks])
        return [float(part[r - 1]) for r in ranks]
    return [float(x.kthvalue(r).values) for r in ranks]


def _exp(v: float) -> float:
    return math.exp(min(v, 700.0))


def sample_positions(numel: int, width: int, size: int | None = None) -> slice:
    """A strided slice of about ``size`` (default SAMPLE) positions of a flattened [*, width]
    tensor; the stride is coprime to the row width, so the sample walks across columns."""
    stride = max(numel // max(SAMPLE if size is None else size, 1), 1)
    while stride > 1 and math.gcd(stride, max(width, 1)) != 1:
        stride += 1
    return slice(0, numel, stride)


def tail_bounds(sample: torch.Tensor, n: int) -> tuple[float, float] | None:
    """(lo, hi) from a 1-D sample of the masked log r such that, with high probability, more than
    rank(p1) tokens are < lo, more than n - rank(p99) + 1 are > hi and as many |log r| exceed
    max(-lo, hi); None when the sample is too small to tell (keep every token).

    Margin: 5 binomial standard deviations of the sample count plus 5, so a miss (which only costs
    the slower exact path) has probability ~1e-6 per tail for a sample drawn at random."""
    s = sample.numel()
    if s < MIN_SAMPLE:
        return None
    need = max(nearest_rank(Q_LOW, n), n - nearest_rank(Q_HIGH, n) + 1) / n  # share needed in each tail
    i = math.ceil(s * need + 5.0 * math.sqrt(s * need * (1.0 - need)) + 5.0)
    if 2 * i >= s:
        return None
    low, high, big = _kth(sample, i + 1), _kth(sample, s - i), _kth(sample.abs(), s - i)
    lo, hi = max(low, -big), min(high, big)  # keep x < lo or x > hi: a superset of all three tails
    return (lo, hi) if lo < hi else None


class ChunkStats:
    """objective_stats accumulated chunk by chunk over flattened [B, T] tensors.

    Per chunk [s, e): ``tokens(s, e, dtype)`` first, then any of ``log_ratio(x)``,
    ``multiplier(m)``, ``mean(key, x)``, ``zeta(u, a)`` with that chunk's values (1-D, contiguous,
    of that dtype; they are only read); ``result()`` at the end.

    mask           [B, T] bool
    clip_thr       0.1 * M(1): a 0-d tensor, or [B, T] / broadcastable (per advantage sign)
    bounds         (lo, hi) from :func:`tail_bounds`, or None to keep every masked log r
    log_ratio_all  callable -> all masked log r (1-D), for the rare exact fallback
    m_scale        reported M = m_scale * the kernel's M (mhpo-rescaled)
    keys           mean keys to report even when no chunk gave them
    """

    def __init__(
        self, mask: torch.Tensor, clip_thr, bounds, log_ratio_all, m_scale: float = 1.0, keys=(), n: int | None = None
    ):
        self.mask = mask.reshape(-1)
        self.n = int(torch.count_nonzero(self.mask)) if n is None else n
        if torch.is_tensor(clip_thr):
            clip_thr = clip_thr.expand(mask.shape).reshape(-1) if clip_thr.numel() > 1 else clip_thr.reshape(())
        self.clip_thr = clip_thr
        self.bounds = bounds
        self.log_ratio_all = log_ratio_all
        self.m_scale = m_scale
        self.keys = tuple(keys)
        self.cpu = self.mask.device.type == "cpu"
        self.sums: dict[str, float] = {}
        self.kept: list[torch.Tensor] = []
        self.clipped = 0
        self.ratio_overflow = False
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
        if self.cpu:
            self._m_np = self._m.numpy()

    def _add(self, key: str, masked_sum: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(masked_sum)

    def mean(self, key: str, x: torch.Tensor) -> None:
        """Add the masked sum of x to ``key`` (reported as sum / tokens)."""
        self._add(key, torch.dot(x, self._mf))

    def _kept(self, x: torch.Tensor, dist: torch.Tensor, cut: float) -> torch.Tensor:
        """The masked x whose ``dist`` (|x| or |x - mid|, a scratch) exceeds ``cut`` (a copy)."""
        if self.cpu:
            b = self._bool()
            np.greater(dist.numpy(), cut, out=b)
            np.logical_and(b, self._m_np, out=b)
            return torch.from_numpy(np.take(x.numpy(), np.flatnonzero(b)))
        return x[(dist > cut) & self._m]

    def _bool(self) -> np.ndarray:
        size = self._e - self._s
        b = getattr(self, "_bool_buf", None)
        if b is None or b.size < size:
            b = self._bool_buf = np.empty(size, dtype=bool)
        return b[:size]

    def log_ratio(self, x: torch.Tensor) -> None:
        """ratio and |log r| sums, and the masked log r outside [lo, hi] (the tails)."""
        buf = self._scratch("a", x.dtype)
        ratio = torch.dot(torch.exp(x, out=buf), self._mf)
        self.ratio_overflow |= not bool(torch.isfinite(ratio))
        self._add("ratio/mean", ratio)
        dist = torch.abs(x, out=buf)
        self._add("log_ratio/abs_mean", torch.dot(dist, self._mf))
        if self.bounds is None:
            self.kept.append(x[self._m].clone())
            return
        lo, hi = self.bounds
        shrink = 1.0 - 1e-6  # float rounding of the distance may only ever keep more
        if lo < 0.0 < hi:  # x < lo or x > hi  implies  |x| > min(-lo, hi): the |x| just summed serves
            self.kept.append(self._kept(x, dist, min(-lo, hi) * shrink))
        else:  # |x - mid| > half  iff  x < lo or x > hi
            mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
            self.kept.append(self._kept(x, torch.sub(x, mid, out=buf).abs_(), half * shrink))

    def multiplier(self, m: torch.Tensor) -> None:
        """M mean and the clipped count (masked M < clip_thr)."""
        if self.m_scale != 1.0:
            m = m * self.m_scale
        self.mean("multiplier/mean", m)
        thr = self.clip_thr
        if torch.is_tensor(thr) and thr.dim():
            thr = thr[self._s : self._e]
        if self.cpu:
            b = self._bool()
            np.less(m.numpy(), thr.numpy() if torch.is_tensor(thr) else thr, out=b)
            self.clipped += int(np.count_nonzero(np.logical_and(b, self._m_np, out=b)))
        else:
            self.clipped += int(torch.count_nonzero(torch.lt(m, thr) & self._m))

    def multiplier_from(self, w: torch.Tensor, t2: torch.Tensor) -> None:
        """M = w * (1 - t2), as the fused kernel forms it (the same float operations)."""
        self.multiplier(torch.addcmul(w, w, t2, value=-1.0, out=self._scratch("a", w.dtype)))

    def zeta(self, u: torch.Tensor, a: float) -> None:
        """zeta = a * u and survival = exp(-zeta), from the fused kernel's u = zeta / a."""
        self._add("mhpo/zeta_mean", torch.dot(u, self._mf) * a)
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
        for key in self.keys:
            stats[key] = 0.0
        for key, total in self.sums.items():
            stats[key] = total / n
        if self.ratio_overflow:  # exp overflowed in the compute dtype: clamp in float64 as before
            stats["ratio/mean"] = float(self.log_ratio_all().double().clamp(max=700.0).exp().mean())
        stats["clip_frac"] = self.clipped / n
        lo_v, p1, p99, hi_v, abs_p99 = self._order_stats()
        stats["ratio/min"], stats["ratio/max"] = _exp(lo_v), _exp(hi_v)
        stats["ratio/p1"], stats["ratio/p99"] = _exp(p1), _exp(p99)
        stats["log_ratio/abs_p99"] = abs_p99
        return stats

    def _order_stats(self) -> tuple[float, float, float, float, float]:
        """(min, p1, p99, max, |.|p99) of the masked log r, exact (see the module docstring)."""
        n = self.n
        k1, k99 = nearest_rank(Q_LOW, n), nearest_rank(Q_HIGH, n)
        kept = torch.cat(self.kept) if self.kept else torch.zeros(0)
        if self.bounds is None:  # every masked token was kept
            v = kept
            (p1, p99), (mn, mx) = masked_quantiles(v, (Q_LOW, Q_HIGH)), (float(v.min()), float(v.max()))
            return mn, p1, p99, mx, masked_quantiles(v.abs(), (Q_HIGH,))[0]
        lo, hi = self.bounds
        low, high = kept[kept < lo], kept[kept > hi]  # every masked token < lo (> hi) is in low (high)
        big = kept.abs()
        big = big[big > max(-lo, hi)]  # and every |log r| > max(-lo, hi) in big
        out: list[float | None] = [None] * 5
        if low.numel() >= k1:  # every token < lo is in `low`, so its order statistics are the global ones
            out[0], out[1] = float(low.min()), _kth(low, k1)
        top = n - k99 + 1  # p99 is the top-th largest
        if high.numel() >= top:
            out[3], out[2] = float(high.max()), _kth(high, high.numel() - top + 1)
        top_abs = n - nearest_rank(Q_HIGH, n) + 1
        if big.numel() >= top_abs:
            out[4] = _kth(big, big.numel() - top_abs + 1)
        if any(v is None for v in out):  # a threshold missed: the exact path over every masked token
            v = self.log_ratio_all()
            exact = [
                float(v.min()),
                *masked_quantiles(v, (Q_LOW, Q_HIGH)),
                float(v.max()),
                masked_quantiles(v.abs(), (Q_HIGH,))[0],
            ]
            out = [exact[i] if out[i] is None else out[i] for i in range(5)]
        return out[0], out[1], out[2], out[3], out[4]


def _kth(x: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of a 1-D tensor."""
    if x.device.type == "cpu":
        return float(np.partition(x.numpy(), k - 1)[k - 1])
    return float(x.kthvalue(k).values)


def log_ratio_order_stats(values: torch.Tensor) -> dict[str, float]:
    """ratio/{min,max,p1,p99} and log_ratio/abs_p99 of the masked log r ``values`` (1-D), exact:
    what objective_stats reports for one batch, here for several batches' tokens together."""
    if values.numel() == 0:
        return {k: 0.0 for k in ("ratio/min", "ratio/max", "ratio/p1", "ratio/p99", "log_ratio/abs_p99")}
    p1, p99 = masked_quantiles(values, (Q_LOW, Q_HIGH))
    return {
        "ratio/min": _exp(float(values.min())),
        "ratio/max": _exp(float(values.max())),
        "ratio/p1": _exp(p1),
        "ratio/p99": _exp(p99),
        "log_ratio/abs_p99": masked_quantiles(values.abs(), (Q_HIGH,))[0],
    }


def masked_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked log r (1-D) exactly as policy_loss forms it: half precision in float32."""
    dtype = torch.float32 if logp.dtype in (torch.float16, torch.bfloat16) else logp.dtype
    return (logp.detach().to(dtype) - old_logp.detach().to(dtype))[mask.bool()]


def chunk_len(device: torch.device, numel: int) -> int:
    return max(min(CHUNK if device.type == "cpu" else numel, numel), 1)


def make_chunk_stats(
    log_r_sample: torch.Tensor, mask: torch.Tensor, clip_thr, log_ratio_all, m_scale: float = 1.0, keys=()
) -> ChunkStats:
    """A ChunkStats whose tail thresholds come from ``log_r_sample`` (masked log r at
    :func:`sample_positions`)."""
    n = int(torch.count_nonzero(mask))
    bounds = tail_bounds(log_r_sample, n) if n else None
    return ChunkStats(mask, clip_thr, bounds, log_ratio_all, m_scale, keys, n=n)


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
    width = log_r.shape[-1] if log_r.dim() else 1
    lr = log_r.detach().contiguous().reshape(-1)
    m = mask.reshape(-1)
    pos = sample_positions(lr.numel(), width)
    thr = DAMPED * on_policy_multiplier
    flat = {f"mhpo/{k}_mean": extras[k].detach().contiguous().reshape(-1) for k in _MHPO if k in extras}
    if kl is not None:
        flat["kl"] = kl.detach().contiguous().reshape(-1)
    acc = make_chunk_stats(lr[pos][m[pos]], mask, thr, lambda: lr[m], keys=flat)
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
