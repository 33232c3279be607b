"""Telemetry end to end: a real Prometheus scrapes a real cispo-server while the test runs a
workload whose clip counts, token counts and ratio distribution it computes itself, then every
dashboard and rule expression is evaluated through Prometheus' HTTP API.

The workload: Forward learns the model's target logprobs t of fixed data (Forward changes
nothing); each forward_backward then sends sampling logprobs s = t - log(r) for ratios r chosen
one per histogram bucket, well inside it, so the test knows every pre-clip ratio exp(t - s).
Some advantages are 0 (inactive tokens, given ratios that would clip if they counted). Batches
use cispo (default and custom thresholds) and ppo, unary and on a Stream, with invalid requests
in between (unary and stream items) and successful calls after them; OptimStep comes last,
since it changes t.

Prometheus is first scraped before the workload, when every counter the clip rate uses is 0, and
all rates use windows longer than the test: a ratio of rates is then exactly a ratio of counts.

Per-run telemetry has a server of its own: the default run, then, once it is unloaded, two LoRA
runs side by side with workloads of their own, then one of them unloaded; Prometheus is scraped
after each phase, and each run's series, the run gauges and the dashboard's run variable must
say exactly which runs live and what each did.
"""

import copy
import math
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from dashboard_exprs import all_expressions, load_dashboard, substitute
from prometheus_process import PrometheusProcess
from server_process import ServerProcess

from cispo.service.metrics import CLIP_FRACTION_BUCKETS, CLIPS, RATIO_LOSSES
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from cispo.worker import LOSS_FUNCTIONS, RATIO_BUCKET_EDGES
from cispo.worker.runs import DEFAULT_RUN

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
SERVICE = "cispo.v1.TrainingService"
JOB = 'job="cispo"'
# Longer than the whole test, so each rate covers the run since Prometheus' first scrape.
WINDOW = "5m"
VARIABLES = {"__rate_interval": WINDOW, "__interval": "1s", "__range": WINDOW}
INF = math.inf

# One ratio inside each bucket of cispo_importance_ratio (edges RATIO_BUCKET_EDGES, then +Inf),
# far from the edges compared with the float32 rounding of t - s.
BUCKET_RATIOS = (
    0.007,
    0.03,
    0.07,
    0.15,
    0.3,
    0.65,
    0.85,
    0.93,
    0.97,
    0.985,
    0.995,
    1.005,
    1.015,
    1.03,
    1.07,
    1.15,
    1.3,
    1.7,
    2.5,
    3.5,
    4.5,
    6.0,
    9.0,
    20.0,
    150.0,
)
LENGTHS = (24, 20, 16)  # the data: three sequences, 60 tokens
N_TOKENS = sum(LENGTHS)
WORKLOAD_LOSSES = ("cispo", "ppo")  # the losses the workloads train with; the others see no token
# Series with a `run` label (the per-run telemetry), and the dashboard's selector of them.
PER_RUN = (
    "cispo_tokens_total",
    "cispo_importance_ratio_count",
    "cispo_batch_clip_fraction_count",
    "cispo_sampler_trainer_kl_count",
    "cispo_loss_sum",
    "cispo_grad_norm",
    "cispo_optim_steps_total",
)


def bucket_index(values, edges) -> np.ndarray:
    """Index of each value's bucket, `le` semantics (edges[i-1] < v <= edges[i]); len(edges) = +Inf."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")


@dataclass
class Expected:
    """What the server's metrics must say, as the test computes it from what it sent."""

    tokens: Counter = field(default_factory=Counter)  # (loss_fn, clip) -> active tokens
    ratio_buckets: dict = field(
        default_factory=lambda: {f: np.zeros(len(RATIO_BUCKET_EDGES) + 1, np.int64) for f in RATIO_LOSSES}
    )
    ratio_sum: Counter = field(default_factory=Counter)  # loss_fn -> sum of active ratios
    clip_fractions: dict = field(default_factory=lambda: {f: [] for f in RATIO_LOSSES})
    kl_means: dict = field(default_factory=lambda: {f: [] for f in RATIO_LOSSES})
    tokens_processed: Counter = field(default_factory=Counter)  # op -> tokens
    sampled_tokens: int = 0
    sampled_sequences: Counter = field(default_factory=Counter)  # stop_reason -> sequences
    ops: Counter = field(default_factory=Counter)  # op -> operations, failed ones included
    op_errors: Counter = field(default_factory=Counter)  # (op, code) -> failed operations
    rpcs: Counter = field(default_factory=Counter)  # (method, code) -> RPCs
    optim_steps: int = 0
    loss_sum: float = 0.0  # loss:sum of the last forward_backward
    grad_norm: float = 0.0  # of the last optim_step

    def cumulative(self, loss_fn: str) -> dict[float, int]:
        """{le: cumulative count} of cispo_importance_ratio{loss_fn}."""
        return dict(zip([*RATIO_BUCKET_EDGES, INF], np.cumsum(self.ratio_buckets[loss_fn]).tolist()))

    def clip_rate(self, loss_fn: str, clips: tuple[str, ...]) -> float:
        active = sum(self.tokens[loss_fn, c] for c in ("high", "low", "none"))
        return sum(self.tokens[loss_fn, c] for c in clips) / active


@dataclass
class Batch:
    """One forward_backward request and the stats the engine must compute for it."""

    request: pb.ForwardBackwardInput
    loss_fn: str
    high: int
    low: int
    active: int
    ratio_bucket_counts: np.ndarray
    ratio_sum: float
    kl_k3_mean: float


class Workload:
    """Raw-stub calls on run `model_id` ("": the default run) that keep `expected` up to date."""

    def __init__(self, stub: training_pb2_grpc.TrainingServiceStub, model_id: str = ""):
        self.stub = stub
        self.model_id = model_id
        self.expected = Expected()
        rng = np.random.default_rng(20240601)
        self.info = self.get_info()
        self.defaults = {f.name: dict(f.default_config) for f in self.info.loss_functions}
        self.tokens = rng.integers(0, self.info.vocab_size, N_TOKENS)
        self.targets = rng.integers(0, self.info.vocab_size, N_TOKENS)
        self.t = None  # the model's target logprobs, float32, from Forward

    # -- requests -------------------------------------------------------------------------------

    def data(self, logprobs, advantages, lengths=LENGTHS, tokens=None, targets=None) -> list[pb.Datum]:
        tokens = self.tokens if tokens is None else tokens
        targets = self.targets if targets is None else targets
        out, start = [], 0
        for n in lengths:
            window = slice(start, start + n)
            out.append(
                pb.Datum(
                    model_input=pb.Tensor(int64_data=tokens[window].tolist()),
                    loss_fn_inputs=pb.LossFnInputs(
                        target_tokens=pb.Tensor(int64_data=targets[window].tolist()),
                        logprobs=pb.Tensor(float_data=np.asarray(logprobs[window], np.float32).tolist()),
                        advantages=pb.Tensor(float_data=np.asarray(advantages[window], np.float32).tolist()),
                    ),
                )
            )
            start += n
        return out

    def plain_input(self, loss_fn: str = "") -> pb.ForwardBackwardInput:
        return pb.ForwardBackwardInput(
            data=self.data(np.full(N_TOKENS, -1.0), np.zeros(N_TOKENS)), loss_fn=loss_fn, model_id=self.model_id
        )

    def batch(self, seed: int, loss_fn: str, config: dict[str, float] | None = None) -> Batch:
        """A valid batch whose ratios the test chose (and so knows)."""
        rng = np.random.default_rng(seed)
        ratios = rng.choice(BUCKET_RATIOS, N_TOKENS)
        advantages = rng.choice([0.0, 0.0, 1.0, -0.5, 2.0], N_TOKENS)
        ratios[advantages == 0] = 50.0  # inactive: clipped high everywhere if it were counted
        s = (self.t.astype(np.float64) - np.log(ratios)).astype(np.float32)
        assert (s <= 0).all(), "sampling logprobs must be <= 0: a ratio below exp(t) does not fit"
        # The engine's arithmetic: t - s in float32, exp in float64.
        log_ratio = (self.t - s).astype(np.float64)
        r = np.exp(log_ratio)
        np.testing.assert_allclose(r, ratios, rtol=1e-4)  # far from every bucket edge
        active = advantages != 0
        thresholds = {**self.defaults[loss_fn], **(config or {})}
        lo, hi = thresholds["clip_low_threshold"], thresholds["clip_high_threshold"]
        ra, lra = r[active], log_ratio[active]
        buckets = np.bincount(bucket_index(ra, RATIO_BUCKET_EDGES), minlength=len(RATIO_BUCKET_EDGES) + 1)
        return Batch(
            request=pb.ForwardBackwardInput(
                data=self.data(s, advantages), loss_fn=loss_fn, loss_fn_config=config or {}, model_id=self.model_id
            ),
            loss_fn=loss_fn,
            high=int((ra > hi).sum()),
            low=int((ra < lo).sum()),
            active=int(active.sum()),
            ratio_bucket_counts=buckets,
            ratio_sum=float(ra.sum()),
            kl_k3_mean=float((ra - 1 - lra).sum() / ra.size),
        )

    def invalid_length(self) -> pb.ForwardBackwardInput:
        """INVALID_ARGUMENT: one datum's logprobs is a token short."""
        request = self.plain_input("cispo")
        del request.data[1].loss_fn_inputs.logprobs.float_data[-1]
        return request

    def too_long(self) -> pb.ForwardBackwardInput:
        """RESOURCE_EXHAUSTED: one datum over max_sequence_length."""
        n = self.info.max_sequence_length + 1
        ids = np.arange(n) % self.info.vocab_size
        return pb.ForwardBackwardInput(data=self.data(np.full(n, -1.0), np.ones(n), (n,), ids, ids))

    # -- calls ----------------------------------------------------------------------------------

    def get_info(self) -> pb.GetInfoResponse:
        info = self.stub.GetInfo(pb.GetInfoRequest(model_id=self.model_id))
        self._ok("get_info", "GetInfo")
        return info

    def forward(self) -> None:
        """Learn t (Forward changes nothing: no gradient, no step)."""
        out = self.stub.Forward(self.plain_input())
        t = np.concatenate([np.frombuffer(o.logprobs.raw_data, "<f4") for o in out.loss_fn_outputs])
        if self.t is not None:
            np.testing.assert_array_equal(t, self.t)
        self.t = t
        self.expected.tokens_processed["forward"] += N_TOKENS
        self._ok("forward", "Forward")

    def forward_backward(self, batch: Batch) -> None:
        out = self.stub.ForwardBackward(batch.request)
        self._check_batch(batch, out)
        self._ok("forward_backward", "ForwardBackward")

    def optim_step(self) -> None:
        out = self.stub.OptimStep(
            pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-3), model_id=self.model_id)
        )
        assert out.grad_norm > 0
        self.expected.optim_steps += 1
        self.expected.grad_norm = out.grad_norm
        self._ok("optim_step", "OptimStep")

    def sample(self, max_tokens: int, stop_tokens: list[int] = ()) -> None:
        """Sample from the current weights; count what came back as the sampler metrics must."""
        out = self.stub.Sample(
            pb.SampleRequest(
                prompt=pb.Tensor(int64_data=self.tokens[:5].tolist()),
                num_samples=3,
                sampling_params=pb.SamplingParams(max_tokens=max_tokens, seed=7, stop_tokens=stop_tokens),
            )
        )
        assert len(out.sequences) == 3
        for sequence in out.sequences:
            self.expected.sampled_tokens += len(sequence.tokens.raw_data) // 8
            self.expected.sampled_sequences[
                pb.StopReason.Name(sequence.stop_reason).removeprefix("STOP_REASON_").lower()
            ] += 1
        self._ok("sample", "Sample")

    def trainable_bytes(self) -> dict[str, int]:
        """ListModels: run id -> trainable_bytes."""
        models = self.stub.ListModels(pb.ListModelsRequest()).models
        self._ok("list_models", "ListModels")
        return {m.model_id: m.trainable_bytes for m in models}

    def fail(self, method: str, op: str, request, code: grpc.StatusCode) -> None:
        with pytest.raises(grpc.RpcError) as raised:
            getattr(self.stub, method)(request)
        assert raised.value.code() == code, raised.value.details()
        self.expected.ops[op] += 1
        self.expected.op_errors[op, code.name] += 1
        self.expected.rpcs[method, code.name] += 1

    def stream(self, items: list[tuple[str, object, object]]) -> None:
        """One Stream; items (op, request, Batch | None for a plain forward | StatusCode expected)."""
        requests = [pb.StreamRequest(request_id=str(i), **{op: request}) for i, (op, request, _) in enumerate(items)]
        answers = list(self.stub.Stream(iter(requests)))
        assert [a.request_id for a in answers] == [r.request_id for r in requests]
        for (op, _, outcome), answer in zip(items, answers):
            self.expected.ops[op] += 1
            if isinstance(outcome, grpc.StatusCode):
                assert answer.WhichOneof("result") == "error" and answer.error.code == outcome.value[0], answer
                self.expected.op_errors[op, outcome.name] += 1
                continue
            assert answer.WhichOneof("result") == op, answer.error
            if outcome is None:
                self.expected.tokens_processed["forward"] += N_TOKENS
            else:
                self._check_batch(outcome, answer.forward_backward)
        self.expected.rpcs["Stream", "OK"] += 1

    def _check_batch(self, batch: Batch, out: pb.ForwardBackwardOutput) -> None:
        """The answer agrees with the test's own numbers; count them as the metrics must."""
        t = np.concatenate([np.frombuffer(o.logprobs.raw_data, "<f4") for o in out.loss_fn_outputs])
        np.testing.assert_allclose(t, self.t, atol=1e-5)
        assert out.metrics["clipped_high:sum"] == batch.high and out.metrics["clipped_low:sum"] == batch.low
        assert out.metrics["active_tokens:sum"] == batch.active
        e, f = self.expected, batch.loss_fn
        e.tokens[f, "high"] += batch.high
        e.tokens[f, "low"] += batch.low
        e.tokens[f, "none"] += batch.active - batch.high - batch.low
        e.ratio_buckets[f] += batch.ratio_bucket_counts
        e.ratio_sum[f] += batch.ratio_sum
        e.clip_fractions[f].append((batch.high + batch.low) / batch.active)
        e.kl_means[f].append(batch.kl_k3_mean)
        e.tokens_processed["forward_backward"] += N_TOKENS
        e.loss_sum = out.metrics["loss:sum"]

    def _ok(self, op: str, method: str) -> None:
        self.expected.ops[op] += 1
        self.expected.rpcs[method, "OK"] += 1


@dataclass
class Run:
    prometheus: PrometheusProcess
    expected: Expected  # after the whole workload
    after_errors: Expected  # after the part with the errors, before the calls that follow them
    scraped_after_errors: dict  # what Prometheus had then: {"tokens": ..., "errors": ..., "handled": ...}
    listed_bytes: dict  # ListModels at the end: run id -> trainable_bytes
    max_runs: int


def wait_for_scrape(prometheus: PrometheusProcess, after: float) -> None:
    """Poll until Prometheus holds a scrape of the server that started after Unix time `after`."""
    prometheus.wait_until(
        lambda: any(float(s["value"][1]) > after for s in prometheus.query(f"timestamp(up{{{JOB}}})")),
        f"a scrape of the server after {after}",
    )


def nonzero(values: dict) -> dict:
    """The series with a value other than 0 (series may exist at 0 before anything happened)."""
    return {key: v for key, v in values.items() if v != 0}


def scraped_counts(prometheus: PrometheusProcess) -> dict:
    return {
        "tokens": prometheus.values(f"cispo_tokens_total{{{JOB}}}", "loss_fn", "clip"),
        "errors": nonzero(prometheus.values(f"cispo_operation_errors_total{{{JOB}}}", "op", "code")),
        "handled": nonzero(
            prometheus.values(
                f'grpc_server_handled_total{{{JOB}, grpc_service="{SERVICE}"}}', "grpc_method", "grpc_code"
            )
        ),
    }


@contextmanager
def served(tmp_path_factory, *args: str):
    """A cispo-server with flags `args`, and a Prometheus that scrapes it with the rules loaded;
    their logs are printed if anything fails."""
    server = ServerProcess(*args, checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    prometheus = None
    try:
        prometheus = PrometheusProcess(
            [f"127.0.0.1:{server.metrics_port}"],
            tmp_path_factory.mktemp("prometheus"),
            rule_files=[REPO / "deploy/prometheus/rules.yaml"],
        )
        yield server, prometheus
    except BaseException:
        print("server log:\n" + server.log())
        if prometheus is not None:
            print("prometheus log:\n" + prometheus.log())
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert server.terminate() == 0, server.log()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with served(tmp_path_factory) as (server, prometheus):
        # A first scrape while every counter is still 0.
        wait_for_scrape(prometheus, 0)
        with grpc.insecure_channel(server.address) as channel:
            w = Workload(training_pb2_grpc.TrainingServiceStub(channel))
            w.forward()
            w.forward_backward(w.batch(1, "cispo"))
            w.forward_backward(w.batch(2, "cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.5}))
            w.forward_backward(w.batch(3, "ppo"))
            w.fail("ForwardBackward", "forward_backward", w.invalid_length(), grpc.StatusCode.INVALID_ARGUMENT)
            w.fail("Forward", "forward", w.plain_input("no_such_loss"), grpc.StatusCode.INVALID_ARGUMENT)
            w.fail(
                "LoadState", "load_state", pb.LoadStateRequest(name="never-saved"), grpc.StatusCode.FAILED_PRECONDITION
            )
            w.fail(
                "Sample",
                "sample",
                pb.SampleRequest(
                    prompt=pb.Tensor(int64_data=[1, 2]), sampling_params=pb.SamplingParams(temperature=-1.0)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            good_cispo, good_ppo = w.batch(4, "cispo"), w.batch(6, "ppo")
            w.stream(
                [
                    ("forward_backward", good_cispo.request, good_cispo),
                    ("forward_backward", w.invalid_length(), grpc.StatusCode.INVALID_ARGUMENT),
                    ("forward", w.plain_input(), None),
                    (
                        "forward_backward",
                        w.batch(5, "ppo", {"clip_high_threshold": 0.5}).request,
                        grpc.StatusCode.INVALID_ARGUMENT,
                    ),
                    ("forward_backward", w.too_long(), grpc.StatusCode.RESOURCE_EXHAUSTED),
                    ("forward_backward", good_ppo.request, good_ppo),
                ]
            )
            after_errors = copy.deepcopy(w.expected)
            wait_for_scrape(prometheus, time.time())
            scraped_after_errors = scraped_counts(prometheus)

            # After the errors: successful calls still count.
            w.forward_backward(w.batch(7, "cispo"))
            w.sample(max_tokens=4)
            w.sample(max_tokens=4, stop_tokens=list(range(w.info.vocab_size)))  # stops at once
            w.optim_step()
            assert w.get_info().step == 1
            listed = w.trainable_bytes()
            done = time.time()
        wait_for_scrape(prometheus, done)
        prometheus.wait_for_rule_evaluation(after=time.time())
        yield Run(prometheus, w.expected, after_errors, scraped_after_errors, listed, w.info.max_runs)


# -- every expression ------------------------------------------------------------------------------


def test_every_dashboard_and_rule_expression_returns_data(run):
    """Each expression succeeds; all but the alert conditions return at least one finite value."""
    expressions = all_expressions(REPO, VARIABLES)
    assert len(expressions) > 20
    problems, firing = [], set()
    for where, promql in expressions:
        result = run.prometheus.query(promql)  # raises unless the status is success
        if where.startswith("rules.yaml alert "):
            if result:
                firing.add(where.removeprefix("rules.yaml alert "))
            continue
        if not any(math.isfinite(float(s["value"][1])) for s in result):
            problems.append(f"{where}: {promql}\n  -> {result}")
    assert not problems, "expressions without data:\n" + "\n".join(problems)
    # The clip rate is far over the alert's threshold; the server is up; no KL 30 minutes ago.
    assert "CispoHighErrorRate" in firing
    assert "CispoHighClipRate" in firing
    assert "CispoServerDown" not in firing
    assert "CispoSamplerTrainerKLRising" not in firing


# -- clipping ------------------------------------------------------------------------------------


def test_clip_counts_equal_the_workloads(run):
    e = run.expected
    assert e.tokens["cispo", "high"] > 0 and e.tokens["cispo", "low"] > 0 and e.tokens["ppo", "low"] > 0
    scraped = run.prometheus.values(f"sum by (loss_fn, clip) (cispo_tokens_total{{{JOB}}})", "loss_fn", "clip")
    expected = {(f, c): float(e.tokens[f, c]) for f in LOSS_FUNCTIONS for c in CLIPS}
    assert scraped == expected
    by_clip = run.prometheus.values(f'sum by (clip) (cispo_tokens_total{{{JOB}, loss_fn="cispo"}})', "clip")
    assert by_clip == {c: float(e.tokens["cispo", c]) for c in CLIPS}


@pytest.mark.parametrize(
    "record, clips",
    [
        ("cispo:clip_rate_high:rate5m", ("high",)),
        ("cispo:clip_rate_low:rate5m", ("low",)),
        ("cispo:clip_rate:rate5m", ("high", "low")),
    ],
)
def test_recorded_clip_rates_equal_the_workloads(run, record, clips):
    recorded = run.prometheus.values(f"{record}{{{JOB}}}", "run", "loss_fn")
    assert {r for r, _ in recorded} == {DEFAULT_RUN}
    for loss_fn in WORKLOAD_LOSSES:
        assert recorded[DEFAULT_RUN, loss_fn] == pytest.approx(run.expected.clip_rate(loss_fn, clips), rel=1e-9)
    for loss_fn in set(LOSS_FUNCTIONS) - set(WORKLOAD_LOSSES):  # no active tokens: 0/0
        assert math.isnan(recorded[DEFAULT_RUN, loss_fn]), loss_fn


def test_dashboard_clip_rates_equal_the_workloads(run):
    """The dashboard's clip-rate queries (high and low) show the workload's rates per loss."""
    seen = set()
    for where, promql in all_expressions(REPO, VARIABLES):
        match = re.search(r'cispo_tokens_total\{[^}]*clip="(high|low)"', promql)
        if not where.startswith("dashboard") or not match or "/" not in promql:
            continue
        clip = match.group(1)
        seen.add(clip)
        shown = run.prometheus.values(promql, "run", "loss_fn")
        for loss_fn in WORKLOAD_LOSSES:
            assert shown[DEFAULT_RUN, loss_fn] == pytest.approx(run.expected.clip_rate(loss_fn, (clip,)), rel=1e-9), (
                where
            )
    assert seen == {"high", "low"}


def test_batch_clip_fraction_and_kl_count_every_batch(run):
    e, p = run.expected, run.prometheus
    for loss_fn in WORKLOAD_LOSSES:
        fractions = e.clip_fractions[loss_fn]
        counts = p.values(f'cispo_batch_clip_fraction_bucket{{{JOB}, loss_fn="{loss_fn}"}}', "le")
        expected = np.cumsum(
            np.bincount(bucket_index(fractions, CLIP_FRACTION_BUCKETS), minlength=len(CLIP_FRACTION_BUCKETS) + 1)
        )
        assert {float(le): v for le, v in counts.items()} == dict(zip([*CLIP_FRACTION_BUCKETS, INF], expected))
        assert p.scalar(f'cispo_batch_clip_fraction_sum{{{JOB}, loss_fn="{loss_fn}"}}') == pytest.approx(
            sum(fractions), rel=1e-12
        )
        assert p.scalar(f'cispo_sampler_trainer_kl_count{{{JOB}, loss_fn="{loss_fn}"}}') == len(e.kl_means[loss_fn])
        assert p.scalar(f'cispo_sampler_trainer_kl_sum{{{JOB}, loss_fn="{loss_fn}"}}') == pytest.approx(
            sum(e.kl_means[loss_fn]), rel=1e-4
        )


# -- ratio distribution ------------------------------------------------------------------------------


def test_ratio_histogram_equals_the_workloads(run):
    e, p = run.expected, run.prometheus
    for loss_fn in RATIO_LOSSES:
        scraped = p.values(f'cispo_importance_ratio_bucket{{{JOB}, loss_fn="{loss_fn}"}}', "le")
        assert {float(le): v for le, v in scraped.items()} == e.cumulative(loss_fn), loss_fn
        total = sum(e.ratio_buckets[loss_fn])
        assert p.scalar(f'cispo_importance_ratio_count{{{JOB}, loss_fn="{loss_fn}"}}') == total
        assert p.scalar(f'cispo_importance_ratio_sum{{{JOB}, loss_fn="{loss_fn}"}}') == pytest.approx(
            e.ratio_sum[loss_fn], rel=1e-5
        )
    # Every bucket got some tokens, and the clip thresholds are edges of the buckets.
    assert (e.ratio_buckets["cispo"] + e.ratio_buckets["ppo"] > 0).all()
    assert {0.8, 1.2, 4.0} <= set(RATIO_BUCKET_EDGES)


def bucket_quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus' histogram_quantile of one histogram's cumulative bucket counts."""
    les = sorted(cumulative)
    counts = [cumulative[le] for le in les]
    rank = q * counts[-1]
    b = next(i for i, c in enumerate([*counts[:-1], INF]) if c >= rank)
    if b == len(les) - 1:
        return les[-2]
    start, below = (les[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    return start + (les[b] - start) * (rank - below) / (counts[b] - below)


@pytest.mark.parametrize("q", [0.05, 0.5, 0.95])
def test_ratio_quantiles_and_distribution_over_the_rate_window(run, q):
    e, p = run.expected, run.prometheus
    combined = {le: e.cumulative("cispo")[le] + e.cumulative("ppo")[le] for le in e.cumulative("cispo")}
    rates = f"sum by (le) (rate(cispo_importance_ratio_bucket{{{JOB}}}[{WINDOW}]))"
    shown = {float(le): v for le, v in p.values(rates, "le").items()}
    assert {le: v / shown[INF] for le, v in shown.items()} == pytest.approx(
        {le: c / combined[INF] for le, c in combined.items()}, rel=1e-9
    )
    assert p.scalar(f"histogram_quantile({q}, {rates})") == pytest.approx(bucket_quantile(q, combined), rel=1e-9)


# -- errors and survival ---------------------------------------------------------------------------------


def test_errors_show_by_code(run):
    e, p = run.expected, run.prometheus
    assert e.op_errors == Counter(
        {
            ("forward_backward", "INVALID_ARGUMENT"): 3,
            ("forward", "INVALID_ARGUMENT"): 1,
            ("forward_backward", "RESOURCE_EXHAUSTED"): 1,
            ("load_state", "FAILED_PRECONDITION"): 1,
            ("sample", "INVALID_ARGUMENT"): 1,
        }
    )
    scraped = nonzero(p.values(f"cispo_operation_errors_total{{{JOB}}}", "op", "code"))
    assert scraped == {key: float(n) for key, n in e.op_errors.items()}
    assert p.values(f'sum by (code) (cispo_operation_errors_total{{{JOB}, code="INVALID_ARGUMENT"}})', "code") == {
        "INVALID_ARGUMENT": 5.0
    }

    handled = nonzero(
        p.values(f'grpc_server_handled_total{{{JOB}, grpc_service="{SERVICE}"}}', "grpc_method", "grpc_code")
    )
    assert handled == {key: float(n) for key, n in e.rpcs.items()}
    assert handled["ForwardBackward", "INVALID_ARGUMENT"] == 1 and handled["Forward", "INVALID_ARGUMENT"] == 1
    assert handled["Stream", "OK"] == 1  # a stream answers bad items with errors of their own
    types = p.values(
        f'grpc_server_handled_total{{{JOB}, grpc_service="{SERVICE}", grpc_method="Stream"}} > 0', "grpc_type"
    )
    assert set(types) == {"bidi_stream"}
    started = nonzero(
        p.values(f'sum by (grpc_method) (grpc_server_started_total{{{JOB}, grpc_service="{SERVICE}"}})', "grpc_method")
    )
    assert started == {m: float(sum(n for (method, _), n in e.rpcs.items() if method == m)) for m, _ in e.rpcs}

    operations = nonzero(p.values(f"cispo_request_seconds_count{{{JOB}}}", "op"))
    assert operations == {op: float(n) for op, n in e.ops.items()}
    assert p.values(f"cispo_tokens_processed_total{{{JOB}}}", "op") == {
        op: float(n) for op, n in e.tokens_processed.items()
    }


def test_metrics_survive_errors(run):
    """After the errors, Prometheus had exact counts; the calls that followed still count, and
    the target is up with nothing left in flight."""
    before, after, p = run.after_errors, run.expected, run.prometheus
    scraped = run.scraped_after_errors
    assert scraped["tokens"] == {key: float(before.tokens[key]) for key in scraped["tokens"]}
    assert scraped["errors"] == {key: float(n) for key, n in before.op_errors.items()}
    assert scraped["handled"] == {key: float(n) for key, n in before.rpcs.items()}

    now = scraped_counts(p)
    assert now["tokens"] == {key: float(after.tokens[key]) for key in now["tokens"]}
    assert now["tokens"][("cispo", "none")] > scraped["tokens"][("cispo", "none")]
    assert now["errors"] == scraped["errors"]  # successful calls add no errors
    assert now["handled"][("OptimStep", "OK")] == 1
    assert p.scalar(f"cispo_optim_steps_total{{{JOB}}}") == after.optim_steps == 1
    assert p.scalar(f"cispo_grad_norm{{{JOB}}}") == pytest.approx(after.grad_norm, rel=1e-12)
    assert p.scalar(f"cispo_loss_sum{{{JOB}}}") == pytest.approx(after.loss_sum, rel=1e-12)
    assert p.scalar(f"up{{{JOB}}}") == 1
    assert p.scalar(f"cispo_inflight_requests{{{JOB}}}") == 0
    assert p.scalar(f"cispo_queue_depth{{{JOB}}}") == 0
    assert p.scalar(f"cispo_world_size{{{JOB}}}") == 1
    assert p.query(f"absent(up{{{JOB}}})") == []


# -- rates see every observation, even errors that all come between two scrapes ---------------------------
# (every series exists at 0 from the server's start)


def test_operation_error_rates_count_every_error(run):
    e, p = run.expected, run.prometheus
    ratio = p.scalar(f"cispo:operation_error_ratio:rate5m{{{JOB}}}")
    assert ratio == pytest.approx(sum(e.op_errors.values()) / sum(e.ops.values()), rel=1e-9)
    by_code = nonzero(p.values(f"sum by (code) (rate(cispo_operation_errors_total{{{JOB}}}[{WINDOW}]))", "code"))
    errors_by_code = Counter()
    for (_, code), n in e.op_errors.items():
        errors_by_code[code] += n
    assert by_code.keys() == errors_by_code.keys()
    assert {c: v / by_code["INVALID_ARGUMENT"] for c, v in by_code.items()} == pytest.approx(
        {c: n / errors_by_code["INVALID_ARGUMENT"] for c, n in errors_by_code.items()}, rel=1e-9
    )


def test_grpc_error_rate_counts_every_error(run):
    e, p = run.expected, run.prometheus
    failed = sum(n for (_, code), n in e.rpcs.items() if code != "OK")
    ratio = p.scalar(f'cispo:grpc_error_ratio:rate5m{{{JOB}, grpc_service="{SERVICE}"}}')
    assert ratio == pytest.approx(failed / sum(e.rpcs.values()), rel=1e-9)


def test_recorded_kl_mean_counts_every_batch(run):
    recorded = run.prometheus.values(f"cispo:sampler_trainer_kl:mean5m{{{JOB}}}", "loss_fn")
    for loss_fn in WORKLOAD_LOSSES:
        kl = run.expected.kl_means[loss_fn]
        assert recorded[loss_fn] == pytest.approx(sum(kl) / len(kl), rel=1e-6), loss_fn


def test_sampler_metrics_count_every_sampled_token_and_sequence(run):
    """Sampled tokens and sequences by stop reason equal the answers; the dashboard shows them."""
    e, p = run.expected, run.prometheus
    assert e.sampled_sequences["length"] > 0 and e.sampled_sequences["stop"] >= 3
    assert p.scalar(f"cispo_sampled_tokens_total{{{JOB}}}") == e.sampled_tokens
    assert nonzero(p.values(f"cispo_sampled_sequences_total{{{JOB}}}", "stop_reason")) == {
        reason: float(n) for reason, n in e.sampled_sequences.items()
    }
    assert p.scalar(f"cispo_sampler_queue_depth{{{JOB}}}") == 0
    panels = {where: promql for where, promql in all_expressions(REPO, VARIABLES) if "cispo_sampled" in promql}
    tokens_per_second = next(q for q in panels.values() if "cispo_sampled_tokens_total" in q)
    by_reason = next(q for q in panels.values() if "cispo_sampled_sequences_total" in q)
    assert p.scalar(tokens_per_second) > 0
    rates = p.values(by_reason, "stop_reason")
    assert {r: v / rates["length"] for r, v in rates.items()} == pytest.approx(
        {r: n / e.sampled_sequences["length"] for r, n in e.sampled_sequences.items()}, rel=1e-9
    )


# -- training runs ---------------------------------------------------------------------------------------


def run_values(prometheus: PrometheusProcess, metric: str) -> set[str]:
    """The `run` label values `metric` has now."""
    return {s["metric"].get("run", "") for s in prometheus.query(f"{metric}{{{JOB}}}")}


def runs_gauges(prometheus: PrometheusProcess) -> tuple[float, dict]:
    """(cispo_training_runs, {run: cispo_run_trainable_bytes})."""
    return (
        prometheus.scalar(f"cispo_training_runs{{{JOB}}}"),
        prometheus.values(f"cispo_run_trainable_bytes{{{JOB}}}", "run"),
    )


def test_the_default_runs_series_carry_its_model_id(run):
    """A server whose clients name no run: every per-run series is the default run's, the one
    live run; its trainable bytes are what ListModels says."""
    p = run.prometheus
    for metric in PER_RUN:
        assert run_values(p, metric) == {DEFAULT_RUN}, metric
    assert run.listed_bytes.keys() == {DEFAULT_RUN} and run.listed_bytes[DEFAULT_RUN] > 0
    assert runs_gauges(p) == (1, {DEFAULT_RUN: float(run.listed_bytes[DEFAULT_RUN])})
    assert p.scalar(f"cispo_training_runs_max{{{JOB}}}") == run.max_runs == 16


@dataclass
class Phase:
    """What Prometheus and the server's /metrics said after one phase of the runs' workload."""

    runs: dict  # PER_RUN metric -> its run label values
    gauges: tuple  # runs_gauges()
    listed: dict  # ListModels: run id -> trainable_bytes
    exposed_runs: set  # the run label values in the server's own /metrics text
    variable: set  # what the dashboard's run variable query answers, over the phase's time range
    tokens: dict  # (run, loss_fn, clip) -> cispo_tokens_total, the non-zero ones


@dataclass
class Runs:
    prometheus: PrometheusProcess
    phases: dict  # name -> Phase: "start", "default", "unloaded", "created", "lora", "one_left"
    workloads: dict  # run id -> Workload, of the LoRA runs
    max_runs: int


def exposed_runs(metrics_port: int) -> set[str]:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return set(re.findall(r'\brun="([^"]*)"', text))


def run_variable(prometheus: PrometheusProcess, since: float) -> set[str]:
    """The dashboard's `run` variable, label_values(<selector>, run), as Grafana asks for it:
    the label's values on the series the selector matches over the time range [since, now]."""
    variable = next(v for v in load_dashboard(REPO)["templating"]["list"] if v["name"] == "run")
    selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", substitute(variable["query"])).groups()
    return set(prometheus.api(f"label/{label}/values", **{"match[]": selector, "start": since, "end": time.time()}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with served(tmp_path_factory, "--max-runs", "3", "--metrics-run-label", "id") as (server, prometheus):
        phases, since = {}, 0.0
        with grpc.insecure_channel(server.address) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            default = Workload(stub)  # GetInfo of no run makes none

            def phase(name: str) -> None:
                nonlocal since
                listed = default.trainable_bytes()
                wait_for_scrape(prometheus, time.time())
                phases[name] = Phase(
                    runs={metric: run_values(prometheus, metric) for metric in PER_RUN},
                    gauges=runs_gauges(prometheus),
                    listed=listed,
                    exposed_runs=exposed_runs(server.metrics_port),
                    variable=run_variable(prometheus, since),
                    tokens=nonzero(prometheus.values(f"cispo_tokens_total{{{JOB}}}", "run", "loss_fn", "clip")),
                )
                since = time.time()

            wait_for_scrape(prometheus, 0)
            phase("start")
            default.forward()  # makes the default run
            default.forward_backward(default.batch(1, "cispo"))
            default.optim_step()
            phase("default")
            stub.UnloadModel(pb.UnloadModelRequest(model_id=DEFAULT_RUN))
            phase("unloaded")
            workloads = {}
            for seed in (1, 2):
                model_id = stub.CreateModel(
                    pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=4, seed=seed))
                ).model_id
                workloads[model_id] = Workload(stub, model_id)
            phase("created")  # a scrape of the new runs' series at 0, as for the default run at start
            a, b = workloads.values()
            for w in (a, b):
                w.forward()
            a.forward_backward(a.batch(11, "cispo"))
            b.forward_backward(b.batch(21, "cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.5}))
            a.forward_backward(a.batch(12, "ppo"))
            a.optim_step()  # b keeps its gradient, and takes no step
            phase("lora")
            stub.UnloadModel(pb.UnloadModelRequest(model_id=a.model_id))
            phase("one_left")
        prometheus.wait_for_rule_evaluation(after=time.time())
        yield Runs(prometheus, phases, workloads, default.info.max_runs)


def test_runs_series_follow_the_live_runs(runs):
    """Each run's series exist while it lives, and only then (the default run's zeros from the
    start aside); the run gauges count the live runs, with the bytes ListModels reports."""
    phases, (a, b) = runs.phases, runs.workloads
    assert runs.max_runs == 3
    expected = {
        "start": ({DEFAULT_RUN}, set()),  # the default run is made on first use; its series are there before
        "default": ({DEFAULT_RUN}, {DEFAULT_RUN}),
        "unloaded": (set(), set()),
        "created": ({a, b}, {a, b}),  # at 0: a CreateModel makes the run's series
        "lora": ({a, b}, {a, b}),
        "one_left": ({b}, {b}),
    }
    for name, (series, live) in expected.items():
        phase = phases[name]
        assert phase.runs == dict.fromkeys(PER_RUN, series), name
        assert phase.exposed_runs == series, name
        assert phase.listed.keys() == live and all(n > 0 for n in phase.listed.values()), name
        assert phase.gauges == (len(live), {r: float(n) for r, n in phase.listed.items()}), name
    # Each run's own bytes: a took a step (AdamW moments, two per weight, and no gradient), b did
    # not (a gradient, one per weight).
    assert phases["lora"].listed[a] > phases["lora"].listed[b]
    assert phases["one_left"].listed[b] == phases["lora"].listed[b]


def test_dashboard_run_variable_lists_the_runs_of_its_time_range(runs):
    """The run variable offers every run with series in the dashboard's time range. (Prometheus
    answers label values from its in-memory head block without a per-series time filter, so runs
    unloaded a little earlier may be offered too.)"""
    phases, (a, b) = runs.phases, runs.workloads
    assert phases["start"].variable == phases["default"].variable == {DEFAULT_RUN}
    assert {a, b} <= phases["lora"].variable <= {DEFAULT_RUN, a, b}
    assert {b} <= phases["one_left"].variable <= {DEFAULT_RUN, a, b}


def test_each_runs_counts_are_its_own(runs):
    """Two LoRA runs side by side: clip counts by run equal each run's workload; so do the ratio
    histogram, KL, loss, grad norm and steps."""
    p, phases, workloads = runs.prometheus, runs.phases, runs.workloads
    assert phases["default"].tokens and {r for r, _, _ in phases["default"].tokens} == {DEFAULT_RUN}
    expected = {(r, f, c): float(n) for r, w in workloads.items() for (f, c), n in w.expected.tokens.items() if n}
    assert {r for r, _, _ in expected} == workloads.keys()
    assert phases["created"].tokens == {} and phases["lora"].tokens == expected
    # After a's unload, b's series are left, with b's counts.
    b = list(workloads.values())[1]
    assert phases["one_left"].tokens == {key: n for key, n in expected.items() if key[0] == b.model_id}
    e, run = b.expected, f'run="{b.model_id}"'
    for loss_fn in RATIO_LOSSES:
        sel = f'{JOB}, loss_fn="{loss_fn}", {run}'
        assert p.scalar(f"cispo_importance_ratio_count{{{sel}}}") == sum(e.ratio_buckets[loss_fn]), loss_fn
        assert p.scalar(f"cispo_sampler_trainer_kl_count{{{sel}}}") == len(e.kl_means[loss_fn]), loss_fn
    assert p.scalar(f"cispo_loss_sum{{{JOB}, {run}}}") == pytest.approx(e.loss_sum, rel=1e-12)
    assert p.scalar(f"cispo_optim_steps_total{{{JOB}, {run}}}") == e.optim_steps == 0  # there at 0 from its creation
    assert p.scalar(f"cispo_grad_norm{{{JOB}, {run}}}") == 0


def test_dashboard_and_recorded_clip_rates_show_one_series_per_run(runs):
    """The clip-rate panels and recording rules, over a window holding both LoRA runs' batches:
    one series per run (and loss), each with its own run's rate; the unloaded run's rates are
    still there for the window after its unload."""
    p, workloads = runs.prometheus, runs.workloads
    expected = {
        (r, f): w.expected
        for r, w in workloads.items()
        for f in WORKLOAD_LOSSES
        if sum(w.expected.tokens[f, c] for c in CLIPS)
    }
    assert len({r for r, _ in expected}) == 2
    seen = 0
    for where, promql in all_expressions(REPO, VARIABLES):
        match = re.search(r'cispo_tokens_total\{[^}]*clip="(high|low)"', promql)
        if not where.startswith("dashboard") or not match or "/" not in promql:
            continue
        seen += 1
        clip = match.group(1)
        shown = {key: v for key, v in p.values(promql, "run", "loss_fn").items() if not math.isnan(v)}
        assert shown.keys() >= expected.keys() and {r for r, _ in shown} <= {DEFAULT_RUN, *workloads}, where
        for (r, f), e in expected.items():
            assert shown[r, f] == pytest.approx(e.clip_rate(f, (clip,)), rel=1e-9), (where, r, f)
    assert seen == 2
    recorded = p.values(f"cispo:clip_rate:rate5m{{{JOB}}}", "run", "loss_fn")
    for (r, f), e in expected.items():
        assert recorded[r, f] == pytest.approx(e.clip_rate(f, ("high", "low")), rel=1e-9), (r, f)
