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
    0.01, 0.05, 0.1, 0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0,
    1.01, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 100.0,
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


def token_stats(
    active_T: torch.Tensor,
    log_ratio_T: torch.Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_log_ratio_T: torch.Tensor | None = None,
) -> dict:
    """Active-token count and ratio statistics over active tokens, as BatchStats fields.

    active_T: (T,) bool. log_ratio_T: (T,) fp32 t - s, already clamped so exp() is finite, or
    None for losses without a ratio. clip_low/clip_high: the loss's bounds, or None if it has
    none. clip_log_ratio_T: (T,) the log ratio the bounds apply to, when not log_ratio_T (a
    sequence ratio). One device-to-host transfer for everything.
    """
    if log_ratio_T is None:
        return dict(active_tokens=int(active_T.sum()))
    lr = log_ratio_T[active_T].double()  # (A,)
    r = lr.exp()
    clip_r = r if clip_log_ratio_T is None else clip_log_ratio_T[active_T].double().exp()
    edges = torch.tensor(RATIO_BUCKET_EDGES, dtype=torch.float64, device=r.device)
    buckets = torch.bincount(torch.bucketize(r, edges), minlength=len(RATIO_BUCKET_EDGES) + 1)
    zero = r.new_zeros(())
    high = (clip_r > clip_high).sum() if clip_high is not None else zero
    low = (clip_r < clip_low).sum() if clip_low is not None else zero
    n = r.numel()
    scalars = torch.stack([
        high.double(), low.double(), r.sum(),
        r.min() if n else r.new_tensor(math.inf), r.max() if n else r.new_tensor(-math.inf),
        (-lr).sum(), (r - 1 - lr).sum(),
    ])
    values = torch.cat([scalars, buckets.double()]).tolist()
    return dict(
        active_tokens=n, clipped_high=int(values[0]), clipped_low=int(values[1]), ratio_tokens=n,
        ratio_sum=values[2], ratio_min=values[3], ratio_max=values[4],
        kl_k1_sum=values[5], kl_k3_sum=values[6],
        ratio_bucket_counts=tuple(int(c) for c in values[7:]),
    )
