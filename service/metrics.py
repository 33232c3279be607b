"""Prometheus metrics of the service; the registry is injectable so tests use a fresh one.

Per-token statistics arrive already reduced on the device (BatchStats: counts and ratio bucket
counts); nothing here loops over tokens. The importance-ratio histogram is exported by a custom
collector from those bucket counts.
"""

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

from cispo.worker import LOSS_FUNCTIONS, RATIO_BUCKET_EDGES, BatchStats

OPS = ("get_info", "forward", "forward_backward", "optim_step", "save_state", "load_state")
# The codes a failed operation can get (service.errors.to_status).
ERROR_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAVAILABLE",
               "INTERNAL")
CLIP_FRACTION_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
KL_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 5.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RatioHistogramCollector:
    """`cispo_importance_ratio{loss_fn}`: a histogram fed with bucket counts in bulk."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {name: [0] * (len(RATIO_BUCKET_EDGES) + 1) for name in LOSS_FUNCTIONS if name != "cross_entropy"}
        self._sums = dict.fromkeys(self._counts, 0.0)

    def add(self, loss_fn: str, stats: BatchStats) -> None:
        if loss_fn not in self._counts:
            return
        with self._lock:
            self._counts[loss_fn] = [a + b for a, b in zip(self._counts[loss_fn], stats.ratio_bucket_counts)]
            self._sums[loss_fn] += stats.ratio_sum

    def collect(self):
        family = HistogramMetricFamily(
            "cispo_importance_ratio", "Pre-clip importance ratio exp(t - s) of active tokens.", labels=["loss_fn"]
        )
        with self._lock:
            for loss_fn, counts in self._counts.items():
                cumulative, buckets = 0, []
                for edge, count in zip([*RATIO_BUCKET_EDGES, float("inf")], counts):
                    cumulative += count
                    buckets.append(("+Inf" if edge == float("inf") else repr(edge), cumulative))
                family.add_metric([loss_fn], buckets, sum_value=self._sums[loss_fn])
        yield family


class ServiceMetrics:
    """Every metric the service exports, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.tokens = Counter("cispo_tokens", "Active tokens (advantage != 0) by clip outcome.",
                              ["loss_fn", "clip"], registry=r)
        self.ratio = RatioHistogramCollector()
        r.register(self.ratio)
        self.clip_fraction = Histogram("cispo_batch_clip_fraction", "Clipped / active tokens, per forward_backward.",
                                       ["loss_fn"], buckets=CLIP_FRACTION_BUCKETS, registry=r)
        self.kl = Histogram("cispo_sampler_trainer_kl", "Sampler-trainer KL estimate k3, per forward_backward.",
                            ["loss_fn"], buckets=KL_BUCKETS, registry=r)
        self.loss_sum = Gauge("cispo_loss_sum", "loss:sum of the last forward_backward.", registry=r)
        self.grad_norm = Gauge("cispo_grad_norm", "Pre-clip gradient norm of the last optim_step.", registry=r)
        self.optim_steps = Counter("cispo_optim_steps", "Optimizer steps taken.", registry=r)
        self.request_seconds = Histogram("cispo_request_seconds", "Operation latency, queueing included.",
                                         ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_processed = Counter("cispo_tokens_processed", "Tokens run through the model.", ["op"], registry=r)
        self.operation_errors = Counter("cispo_operation_errors", "Failed operations (unary or stream items).",
                                        ["op", "code"], registry=r)
        self.queue_depth = Gauge("cispo_queue_depth", "Operations accepted and waiting to run.", registry=r)
        self.inflight = Gauge("cispo_inflight_requests", "Operations accepted and not yet answered.", registry=r)
        self.world_size = Gauge("cispo_world_size", "Data-parallel ranks training this state.", registry=r)
        # Series exist at 0 from the start, so rate() sees even the first observations.
        for loss_fn in LOSS_FUNCTIONS:
            for clip in ("high", "low", "none"):
                self.tokens.labels(loss_fn, clip)
            self.clip_fraction.labels(loss_fn)
            if loss_fn != "cross_entropy":
                self.kl.labels(loss_fn)
        for op in OPS:
            self.request_seconds.labels(op)
            for code in ERROR_CODES:
                self.operation_errors.labels(op, code)
        for op in ("forward", "forward_backward"):
            self.tokens_processed.labels(op)

    def track_cuda_memory(self, device) -> None:
        """GPU memory gauges of the engine's device, read at scrape time."""
        import torch

        for name, read in (("allocated", torch.cuda.memory_allocated), ("reserved", torch.cuda.memory_reserved),
                           ("max_allocated", torch.cuda.max_memory_allocated)):
            gauge = Gauge(f"cispo_cuda_memory_{name}_bytes", f"torch.cuda.memory_{name} of the engine's GPU.",
                          registry=self.registry)
            gauge.set_function(lambda read=read: read(device))

    def observe_batch(self, op: str, loss_fn: str, stats: BatchStats) -> None:
        """Record a successful forward or forward_backward."""
        self.tokens_processed.labels(op).inc(stats.tokens)
        if op != "forward_backward":
            return
        high, low = stats.clipped_high, stats.clipped_low
        self.tokens.labels(loss_fn, "high").inc(high)
        self.tokens.labels(loss_fn, "low").inc(low)
        self.tokens.labels(loss_fn, "none").inc(stats.active_tokens - high - low)
        self.ratio.add(loss_fn, stats)
        self.loss_sum.set(stats.loss_sum)
        if stats.active_tokens:
            self.clip_fraction.labels(loss_fn).observe((high + low) / stats.active_tokens)
        if stats.ratio_tokens:
            self.kl.labels(loss_fn).observe(stats.kl_k3_sum / stats.ratio_tokens)

    def observe_step(self, grad_norm: float) -> None:
        self.grad_norm.set(grad_norm)
        self.optim_steps.inc()
