"""Prometheus metrics of the service; the registry is injectable so tests use a fresh one.

Per-token statistics arrive already reduced on the device (BatchStats: counts and ratio bucket
counts); nothing here loops over tokens. The importance-ratio histogram is exported by a custom
collector from those bucket counts.

Training telemetry is per run: its series carry `run`, a label of the run's model_id chosen by
`--metrics-run-label` (RunLabels: a keyed hash by default, since /metrics has no authentication;
the id itself; or one label for all runs). `default` labels the default run. A run's series are
made when it is created (the default run's at start), so rate() sees its first observations, and
removed when its last run is unloaded, so `run` has no more values than there are live runs
(bounded by --max-runs), the default run's zeros at start aside. The number of runs and each
run's trainable bytes are read from the runs registry at scrape time.
"""

import functools
import hashlib
import hmac
import os
import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

from cispo.worker import LOSS_FUNCTIONS, RATIO_BUCKET_EDGES, BatchStats
from cispo.worker.runs import DEFAULT_RUN

OPS = (
    "get_info",
    "forward",
    "forward_backward",
    "optim_step",
    "save_state",
    "load_state",
    "save_weights_for_sampler",
    "sample",
    "create_model",
    "list_models",
    "unload_model",
)
# The codes a failed operation can get (service.errors.to_status).
ERROR_CODES = (
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "UNAVAILABLE",
    "INTERNAL",
)
CLIPS = ("high", "low", "none")
# The losses with an importance ratio (they take sampling logprobs): ratio histogram and KL.
RATIO_LOSSES = tuple(name for name, loss in LOSS_FUNCTIONS.items() if "logprobs" in loss.required_inputs)
CLIP_FRACTION_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
KL_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 5.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Reads of the runs registry at scrape time that may meet a dict the engine thread is changing.
_SCRAPE_READS = 3


class RatioHistogramCollector:
    """`cispo_importance_ratio{loss_fn,run}`: a histogram fed with bucket counts in bulk."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[int]] = {}  # (loss_fn, run) -> bucket counts
        self._sums: dict[tuple[str, str], float] = {}

    def add_run(self, run: str) -> None:
        """Zero histograms of every ratio loss for `run` (kept if it has some already)."""
        with self._lock:
            for loss_fn in RATIO_LOSSES:
                self._counts.setdefault((loss_fn, run), [0] * (len(RATIO_BUCKET_EDGES) + 1))
                self._sums.setdefault((loss_fn, run), 0.0)

    def forget(self, run: str) -> None:
        with self._lock:
            for key in [key for key in self._counts if key[1] == run]:
                del self._counts[key], self._sums[key]

    def add(self, loss_fn: str, run: str, stats: BatchStats) -> None:
        if loss_fn not in RATIO_LOSSES:
            return
        with self._lock:
            key = (loss_fn, run)
            counts = self._counts.get(key, [0] * len(stats.ratio_bucket_counts))
            self._counts[key] = [a + b for a, b in zip(counts, stats.ratio_bucket_counts)]
            self._sums[key] = self._sums.get(key, 0.0) + stats.ratio_sum

    def describe(self):
        yield self._family()

    def collect(self):
        with self._lock:
            snapshot = [(key, list(counts), self._sums[key]) for key, counts in self._counts.items()]
        family = self._family()
        for labels, counts, total in snapshot:
            cumulative, buckets = 0, []
            for edge, count in zip([*RATIO_BUCKET_EDGES, float("inf")], counts):
                cumulative += count
                buckets.append(("+Inf" if edge == float("inf") else repr(edge), cumulative))
            family.add_metric(list(labels), buckets, sum_value=total)
        yield family

    @staticmethod
    def _family() -> HistogramMetricFamily:
        return HistogramMetricFamily(
            "cispo_importance_ratio",
            "Pre-clip importance ratio exp(t - s) of active tokens.",
            labels=["loss_fn", "run"],
        )


RUN_LABEL_MODES = ("hash", "id", "off")


class RunLabels:
    """The `run` label of a model_id: `hash` is "r-" and 12 hex digits of an HMAC under a key made
    at start (stable while the server runs, and no way back to the id, which would let a scraper
    name the run); `id` is the model_id; `off` is "all" for every run. The default run is
    `default` in every mode but off."""

    def __init__(self, mode: str = "hash"):
        if mode not in RUN_LABEL_MODES:
            raise ValueError(f"run label mode {mode!r}: choose from {', '.join(RUN_LABEL_MODES)}")
        self.mode = mode
        self._key = os.urandom(32)

    def __call__(self, run: str) -> str:
        if self.mode == "off":
            return "all"
        if self.mode == "id" or run == DEFAULT_RUN:
            return run
        return "r-" + hmac.new(self._key, run.encode(), hashlib.sha256).hexdigest()[:12]


class RunsCollector:
    """`cispo_training_runs`, `cispo_training_runs_max`, `cispo_run_trainable_bytes{run}` and
    `cispo_run_state_bytes{run,kind}`, read from the runs registry (worker.runs.TrainingRuns or
    worker.group_runs.GroupRuns) at each scrape."""

    def __init__(self, runs, label: RunLabels):
        self.runs, self.label = runs, label

    def describe(self):
        yield from self._families({}, 0)

    def collect(self):
        for attempt in range(_SCRAPE_READS):
            try:
                sizes = self.runs.memory_use()
                break
            except RuntimeError:  # a dict changed while it was read (the engine thread): read again
                if attempt == _SCRAPE_READS - 1:
                    raise
        yield from self._families(sizes, self.runs.max_runs)

    def _families(self, sizes: dict, max_runs: int):
        yield GaugeMetricFamily("cispo_training_runs", "Live training runs.", value=len(sizes))
        yield GaugeMetricFamily("cispo_training_runs_max", "The most live training runs (--max-runs).", value=max_runs)
        trainable = GaugeMetricFamily(
            "cispo_run_trainable_bytes",
            "Bytes of a run's trainable weights, their gradient and optimizer moments.",
            labels=["run"],
        )
        by_kind = GaugeMetricFamily(
            "cispo_run_state_bytes",
            "Bytes one rank holds of a run's training state (rank 0; sharded: its shards), by "
            "kind: parameters, gradients, optimizer.",
            labels=["run", "kind"],
        )
        by_label: dict[str, list] = defaultdict(list)
        for run, use in sizes.items():
            by_label[self.label(run)].append(use)
        for run, uses in by_label.items():
            trainable.add_metric([run], sum(use.total for use in uses))
            for kind in ("parameters", "gradients", "optimizer"):
                by_kind.add_metric([run, kind], sum(getattr(use, kind) for use in uses))
        yield trainable
        yield by_kind


class ServiceMetrics:
    """Every metric the service exports, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, run_label: str = "hash"):
        self.registry = registry or CollectorRegistry()
        self.run_label = RunLabels(run_label)
        r = self.registry
        ProcessCollector(registry=r)
        self.tokens = Counter(
            "cispo_tokens", "Active tokens (advantage != 0) by clip outcome.", ["loss_fn", "clip", "run"], registry=r
        )
        self.ratio = RatioHistogramCollector()
        r.register(self.ratio)
        self.clip_fraction = Histogram(
            "cispo_batch_clip_fraction",
            "Clipped / active tokens, per forward_backward.",
            ["loss_fn", "run"],
            buckets=CLIP_FRACTION_BUCKETS,
            registry=r,
        )
        self.kl = Histogram(
            "cispo_sampler_trainer_kl",
            "Sampler-trainer KL estimate k3, per forward_backward.",
            ["loss_fn", "run"],
            buckets=KL_BUCKETS,
            registry=r,
        )
        self.loss_sum = Gauge("cispo_loss_sum", "loss:sum of the last forward_backward.", ["run"], registry=r)
        self.grad_norm = Gauge("cispo_grad_norm", "Pre-clip gradient norm of the last optim_step.", ["run"], registry=r)
        self.optim_steps = Counter("cispo_optim_steps", "Optimizer steps taken.", ["run"], registry=r)
        self.request_seconds = Histogram(
            "cispo_request_seconds",
            "Operation latency, queueing included.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_processed = Counter("cispo_tokens_processed", "Tokens run through the model.", ["op"], registry=r)
        self.operation_errors = Counter(
            "cispo_operation_errors", "Failed operations (unary or stream items).", ["op", "code"], registry=r
        )
        self.queue_depth = Gauge("cispo_queue_depth", "Operations accepted and waiting to run.", registry=r)
        self.inflight = Gauge("cispo_inflight_requests", "Operations accepted and not yet answered.", registry=r)
        self.sampled_tokens = Counter("cispo_sampled_tokens", "Tokens generated by Sample requests.", registry=r)
        self.sampled_sequences = Counter(
            "cispo_sampled_sequences", "Sequences generated, by stop reason.", ["stop_reason"], registry=r
        )
        self.sampler_queue_depth = Gauge(
            "cispo_sampler_queue_depth", "Sample requests accepted and waiting to run.", registry=r
        )
        self.world_size = Gauge("cispo_world_size", "Data-parallel ranks training this state.", registry=r)
        self.http_requests = Counter(
            "cispo_http_requests",
            "Tinker HTTP API requests, by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "cispo_http_request_seconds",
            "Tinker HTTP API request latency (a submit, not its operation; retrieve_future includes its long poll).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Series exist at 0 from the start, so rate() sees even the first observations.
        self._runs: dict[str, set[str]] = {}  # label -> the live runs of that label, whose series exist
        self.add_run(DEFAULT_RUN)
        for op in OPS:
            self.request_seconds.labels(op)
            for code in ERROR_CODES:
                self.operation_errors.labels(op, code)
        for op in ("forward", "forward_backward"):
            self.tokens_processed.labels(op)
        for reason in ("length", "stop"):
            self.sampled_sequences.labels(reason)

    def track_cuda_memory(self, device) -> None:
        """GPU memory gauges of the engine's device, read at scrape time."""
        import torch

        for name, read in (
            ("allocated", torch.cuda.memory_allocated),
            ("reserved", torch.cuda.memory_reserved),
            ("max_allocated", torch.cuda.max_memory_allocated),
        ):
            gauge = Gauge(
                f"cispo_cuda_memory_{name}_bytes",
                f"torch.cuda.memory_{name} of the engine's GPU.",
                registry=self.registry,
            )
            gauge.set_function(functools.partial(read, device))

    def track_runs(self, runs) -> None:
        """The number of live runs and each one's trainable bytes, read from `runs` at scrape time."""
        self.registry.register(RunsCollector(runs, self.run_label))

    # -- per-run series: made, observed and removed in the engine's order -------------------------
    # The servicer calls add_run, observe_batch, observe_step and forget_run on the engine thread,
    # right after the operation, so no observation of a run can come after its forget_run.

    def add_run(self, run: str) -> str:
        """Make run `run`'s series, at 0 (a new run, or one used for the first time); its label."""
        label = self.run_label(run)
        if label not in self._runs:
            for metric, labels in self._run_series(label):
                metric.labels(*labels)
            self.ratio.add_run(label)
        self._runs.setdefault(label, set()).add(run)
        return label

    def forget_run(self, run: str) -> None:
        """Remove run `run`'s series (it was unloaded), unless another live run shares its label."""
        label = self.run_label(run)
        live = self._runs.get(label, set())
        live.discard(run)
        if live:
            return
        for metric, labels in self._run_series(label):
            metric.remove(*labels)
        self.ratio.forget(label)
        self._runs.pop(label, None)

    def _live_label(self, run: str) -> str:
        """The label of run `run`, its series made if they are not yet."""
        label = self.run_label(run)
        return label if run in self._runs.get(label, ()) else self.add_run(run)

    def _run_series(self, run: str):
        """(metric, label values) of each labelled series of run `run`."""
        for loss_fn in LOSS_FUNCTIONS:
            for clip in CLIPS:
                yield self.tokens, (loss_fn, clip, run)
            yield self.clip_fraction, (loss_fn, run)
            if loss_fn in RATIO_LOSSES:
                yield self.kl, (loss_fn, run)
        for metric in (self.loss_sum, self.grad_norm, self.optim_steps):
            yield metric, (run,)

    def observe_batch(self, op: str, loss_fn: str, stats: BatchStats, run: str) -> None:
        """Record a successful forward or forward_backward of run `run`."""
        self.tokens_processed.labels(op).inc(stats.tokens)
        if op != "forward_backward":
            return
        run = self._live_label(run)
        high, low = stats.clipped_high, stats.clipped_low
        self.tokens.labels(loss_fn, "high", run).inc(high)
        self.tokens.labels(loss_fn, "low", run).inc(low)
        self.tokens.labels(loss_fn, "none", run).inc(stats.active_tokens - high - low)
        self.ratio.add(loss_fn, run, stats)
        self.loss_sum.labels(run).set(stats.loss_sum)
        if stats.active_tokens:
            self.clip_fraction.labels(loss_fn, run).observe((high + low) / stats.active_tokens)
        if stats.ratio_tokens:
            self.kl.labels(loss_fn, run).observe(stats.kl_k3_sum / stats.ratio_tokens)

    def observe_sample(self, result) -> None:
        """Record a successful sample (a worker SampleResult)."""
        for sequence in result.sequences:
            self.sampled_tokens.inc(len(sequence.tokens))
            self.sampled_sequences.labels(sequence.stop_reason).inc()

    def observe_step(self, grad_norm: float, run: str) -> None:
        """Record a successful optim_step of run `run`."""
        run = self._live_label(run)
        self.grad_norm.labels(run).set(grad_norm)
        self.optim_steps.labels(run).inc()
