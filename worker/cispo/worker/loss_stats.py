"""Per-batch loss statistics, computed on the device in bulk (no Python loop over tokens).

`BatchStats` holds only sums, counts, minima and maxima, so stats of micro-batches and of
data-parallel ranks merge exactly; `metrics()` turns them into the reported dict, whose keys
name their reduction ("loss:sum", "ratio:mean", ...).
"""

import math
from dataclasses import dataclass, fields

import torch

# Upper edges of the importance-ratio histogram buckets (Prometheus `le` semantics: a bucket
# counts ratios <= its edge; one more bucket holds the rest). Log-spaced, dense around 1, and
# the usual thresholds (PPO 0.8/1.2, CISPO caps 2, 4, 5, 8) are edges so clip counts can be read
# off the histogram.
RATIO_BUCKET_EDGES: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.2,
    0.5,
    0.8,
    0.9,
    0.95,
    0.98,
    0.99,
    1.0,
    1.01,
    1.02,
    1.05,
    1.1,
    1.2,
    1.5,
    2.0,
    3.0,
    4.0,
    5.0,
    8.0,
    10.0,
    100.0,
)


@dataclass
class BatchStats:
    """Mergeable statistics of one batch (or micro-batch, or rank's shard).

    Ratio statistics cover active tokens only (advantage != 0, or weight != 0 for
    cross_entropy); `ratio_min`/`ratio_max` are +inf/-inf when there are none.
    """

    loss_sum: float = 0.0
    tokens: int = 0
    active_tokens: int = 0
    clipped_high: int = 0
    clipped_low: int = 0
    ratio_tokens: int = 0  # active tokens that have a ratio (0 for cross_entropy)
    ratio_sum: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    kl_k1_sum: float = 0.0
    kl_k3_sum: float = 0.0
    ratio_bucket_counts: tuple[int, ...] = (0,) * (len(RATIO_BUCKET_EDGES) + 1)

    def merge(self, other: "BatchStats") -> "BatchStats":
        """The stats of both batches together."""
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "ratio_min":
                merged[f.name] = min(a, b)
            elif f.name == "ratio_max":
                merged[f.name] = max(a, b)
            elif f.name == "ratio_bucket_counts":
                merged[f.name] = tuple(x + y for x, y in zip(a, b))
            else:
                merged[f.name] = a + b
        return BatchStats(**merged)

    def metrics(self) -> dict[str, float]:
        """The reported metrics; ratio and KL entries only when some token has a ratio."""
        out = {
            "loss:sum": self.loss_sum,
            "tokens:sum": float(self.tokens),
            "active_tokens:sum": float(self.active_tokens),
            "clipped_high:sum": float(self.clipped_high),
            "clipped_low:sum": float(self.clipped_low),
        }
        if self.ratio_tokens:
            n = self.ratio_tokens
            out |= {
                "ratio:min": self.ratio_min,
                "ratio:mean": self.ratio_sum / n,
                "ratio:max": self.ratio_max,
                "kl_k1:mean": self.kl_k1_sum / n,
                "kl_k3:mean": self.kl_k3_sum / n,
            }
        return out


# A stats vector: (STATS_SIZE,) fp64 on the device, so that micro-batches merge there and the
# host reads one operation's stats in one transfer. Sums first, then the extremes, then buckets.
_SUMS = ("active_tokens", "clipped_high", "clipped_low", "ratio_tokens", "ratio_sum", "kl_k1_sum", "kl_k3_sum")
_MIN, _MAX = len(_SUMS), len(_SUMS) + 1
STATS_SIZE = len(_SUMS) + 2 + len(RATIO_BUCKET_EDGES) + 1


def token_stats(
    active_T: torch.Tensor,
    log_ratio_T: torch.Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_log_ratio_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Active-token count and ratio statistics over active tokens: a stats vector, computed
    with masks on the device (no host sync).

    active_T: (T,) bool. log_ratio_T: (T,) fp32 t - s, already clamped so exp() is finite, or
    None for losses without a ratio. clip_low/clip_high: the loss's bounds, or None if it has
    none. clip_log_ratio_T: (T,) the log ratio the bounds apply to, when not log_ratio_T (a
    sequence ratio).
    """
    a_T = active_T.double()
    zero = a_T.new_zeros(())
    inf = a_T.new_tensor(math.inf)
    if log_ratio_T is None:
        return torch.cat(
            [
                torch.stack([a_T.sum(), *[zero] * (len(_SUMS) - 1), inf, -inf]),
                a_T.new_zeros(len(RATIO_BUCKET_EDGES) + 1),
            ]
        )
    lr_T = log_ratio_T.double()
    r_T = lr_T.exp()
    clip_r_T = r_T if clip_log_ratio_T is None else clip_log_ratio_T.double().exp()
    edges = torch.tensor(RATIO_BUCKET_EDGES, dtype=torch.float64, device=r_T.device)
    buckets = torch.bincount(torch.bucketize(r_T, edges), weights=a_T, minlength=len(RATIO_BUCKET_EDGES) + 1)
    high = ((clip_r_T > clip_high) & active_T).sum().double() if clip_high is not None else zero
    low = ((clip_r_T < clip_low) & active_T).sum().double() if clip_low is not None else zero
    n = a_T.sum()
    return torch.cat(
        [
            torch.stack(
                [
                    n,
                    high,
                    low,
                    n,
                    (r_T * a_T).sum(),
                    (-lr_T * a_T).sum(),
                    ((r_T - 1 - lr_T) * a_T).sum(),
                    torch.where(active_T, r_T, inf).min(),
                    torch.where(active_T, r_T, -inf).max(),
                ]
            ),
            buckets,
        ]
    )


def merge_stats(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The stats vector of several micro-batches together (on the device)."""
    stacked = torch.stack(vectors)
    merged = stacked.sum(0)
    merged[_MIN] = stacked[:, _MIN].min()
    merged[_MAX] = stacked[:, _MAX].max()
    return merged


def stats_from_vector(values: list[float], loss_sum: float, tokens: int) -> BatchStats:
    """BatchStats from a stats vector read to the host, the loss sum and the token count."""
    active, high, low, ratio_tokens, ratio_sum, kl_k1_sum, kl_k3_sum = values[: len(_SUMS)]  # in _SUMS order
    return BatchStats(
        loss_sum=loss_sum,
        tokens=tokens,
        active_tokens=int(active),
        clipped_high=int(high),
        clipped_low=int(low),
        ratio_tokens=int(ratio_tokens),
        ratio_sum=ratio_sum,
        ratio_min=values[_MIN],
        ratio_max=values[_MAX],
        kl_k1_sum=kl_k1_sum,
        kl_k3_sum=kl_k3_sum,
        ratio_bucket_counts=tuple(int(c) for c in values[_MAX + 1 :]),
    )
