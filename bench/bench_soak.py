"""Soak: concurrent Streams against one real server for minutes; nothing lost, nothing doubled,
memory flat, in-flight gauge back to 0.

Run: `.venv/bin/python bench/bench_soak.py` (2 minutes, 8 streams; `--minutes`, `--streams`).

It starts `cispo-server` (the embedded model, on loopback) and opens `--streams` bidirectional
Streams (raw grpc.aio stubs). Each stream keeps `--window` requests in flight, a mix of
forward_backward (50%), forward (35%) and optim_step (15%), every one with its own idempotency
key and a unique request id; about 2% of the forward_backwards are resent at once on the same
stream with the same key (a client retry), and that answer must equal the original's. Answers
are counted by request id. Meanwhile the server's resident set size (VmRSS from /proc/<pid>/status)
is sampled every `--sample-seconds`.

It reports (Markdown) and asserts: no lost answer (every request id answered), no duplicated
answer, no error answer, retried answers identical; RSS at start, end and max, and its slope in
MiB/min after `--warmup-seconds` (a least-squares fit); `cispo_inflight_requests` back to 0 when
the load stops. Exit status 1 when an assertion fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_messages as fm  # noqa: E402  (good batches, seeded)
from server_process import ServerProcess  # noqa: E402

from cispo.v1 import training_pb2 as pb  # noqa: E402
from cispo.v1 import training_pb2_grpc  # noqa: E402


def rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the server is gone
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def scrape(metrics_port: int, name: str) -> float | str | None:
    """The metric's value; None when absent; the error (a str) when /metrics cannot be read."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    except OSError as exc:
        return f"/metrics failed: {exc!r}"
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (v - mv) for t, v in samples) / den if den else float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class StreamStats:
    def __init__(self):
        self.sent = collections.Counter()  # by op
        self.answers = collections.Counter()  # by request id
        self.expected_ids: set[str] = set()
        self.errors = collections.Counter()
        self.wrong_kind = 0
        self.retries = 0
        self.retry_mismatches: list[str] = []
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.answered_at: list[float] = []
        self.final_code = "OK"


async def run_stream(k: int, stub, deadline: float, window: int, seed: int, stats: StreamStats) -> None:
    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    room = asyncio.Semaphore(window)
    sent_at: dict[str, tuple[str, float]] = {}
    originals: dict[str, str] = {}  # retry rid -> original rid
    kept: dict[str, bytes] = {}  # original rid -> its answer (for retried requests)

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    call = stub.Stream(requests())

    async def reader():
        try:
            async for answer in call:
                rid = answer.request_id
                stats.answers[rid] += 1
                stats.answered_at.append(time.monotonic())
                op, t0 = sent_at.pop(rid, ("?", time.monotonic()))
                stats.latencies[op].append(time.monotonic() - t0)
                result = answer.WhichOneof("result")
                if result == "error":
                    stats.errors[
                        grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == answer.error.code)).name
                    ] += 1
                elif result != op and op != "?":
                    stats.wrong_kind += 1
                if rid in kept:
                    kept[rid] = getattr(answer, result).SerializeToString(deterministic=True)
                if rid in originals:
                    first = kept.pop(originals.pop(rid))
                    again = getattr(answer, result).SerializeToString(deterministic=True)
                    if first != again:
                        stats.retry_mismatches.append(rid)
                room.release()
        except grpc.aio.AioRpcError as exc:
            stats.final_code = exc.code().name
            for _ in range(window + 2):  # unblock the writer
                room.release()

    reader_task = asyncio.create_task(reader())
    i = 0
    while time.monotonic() < deadline and stats.final_code == "OK":
        await room.acquire()
        roll = rng.random()
        op = "forward_backward" if roll < 0.5 else ("forward" if roll < 0.85 else "optim_step")
        rid = f"s{k}-{i}"
        i += 1
        if op == "optim_step":
            inner = pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-5), idempotency_key=fm.key(rng))
        else:
            inner = fm.good_batch(rng, max_datums=4, max_len=96, idempotency_key=fm.key(rng))
        req = fm.stream_item(op, rid, inner)
        stats.sent[op] += 1
        stats.expected_ids.add(rid)
        sent_at[rid] = (op, time.monotonic())
        retry = op == "forward_backward" and rng.random() < 0.02
        if retry:
            kept[rid] = b""
        await queue.put(req)
        if retry:  # the same operation, same key, new request id: answered with the original
            await room.acquire()
            again = f"{rid}-retry"
            originals[again] = rid
            stats.retries += 1
            stats.expected_ids.add(again)
            sent_at[again] = (op, time.monotonic())
            await queue.put(fm.stream_item(op, again, inner))
    await queue.put(None)
    await reader_task


async def soak(address: str, streams: int, seconds: float, window: int, seed: int) -> list[StreamStats]:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        deadline = time.monotonic() + seconds
        stats = [StreamStats() for _ in range(streams)]
        await asyncio.gather(*(run_stream(k, stub, deadline, window, seed + k, stats[k]) for k in range(streams)))
        return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--window", type=int, default=4, help="requests in flight per stream")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("server_args", nargs="*", help="extra cispo-server flags (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(*args.server_args, checkpoint_dir=Path(tmp))
        pid = server.proc.pid
        try:
            with grpc.insecure_channel(server.address) as ch:
                info = training_pb2_grpc.TrainingServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=30)
            samples: list[tuple[float, float]] = [(0.0, rss_mib(pid))]
            started = time.monotonic()
            stop = False

            async def sampler():
                while not stop:
                    await asyncio.sleep(args.sample_seconds)
                    samples.append((time.monotonic() - started, rss_mib(pid)))

            async def run():
                nonlocal stop
                task = asyncio.create_task(sampler())
                try:
                    return await soak(server.address, args.streams, args.minutes * 60, args.window, args.seed)
                finally:
                    stop = True
                    await task

            stats = asyncio.run(run())
            elapsed = time.monotonic() - started
            samples.append((elapsed, rss_mib(pid)))
            deadline = time.monotonic() + 15
            inflight = scrape(server.metrics_port, "cispo_inflight_requests")
            while inflight != 0 and time.monotonic() < deadline:
                time.sleep(0.1)
                inflight = scrape(server.metrics_port, "cispo_inflight_requests")
            samples.append((time.monotonic() - started, rss_mib(pid)))
            alive = server.proc.poll() is None
            rc = server.terminate(60) if alive else server.proc.returncode
            log = server.log()
            if not alive or isinstance(inflight, str):
                print(f"server alive after the load: {alive}; inflight: {inflight}\nserver log tail:\n{log[-3000:]}")
        finally:
            server.kill()

    sent = collections.Counter()
    errors = collections.Counter()
    lost = duplicated = unexpected = wrong_kind = retries = 0
    mismatches: list[str] = []
    latencies = collections.defaultdict(list)
    final_codes = collections.Counter()
    for s in stats:
        sent.update(s.sent)
        errors.update(s.errors)
        lost += sum(1 for rid in s.expected_ids if s.answers[rid] == 0)
        duplicated += sum(1 for rid, n in s.answers.items() if n > 1)
        unexpected += sum(1 for rid in s.answers if rid not in s.expected_ids)
        wrong_kind += s.wrong_kind
        retries += s.retries
        mismatches += s.retry_mismatches
        final_codes[s.final_code] += 1
        for op, v in s.latencies.items():
            latencies[op] += v
    total_sent = sum(sent.values()) + retries
    total_answers = sum(sum(s.answers.values()) for s in stats)
    per_stream = [sum(s.answers.values()) for s in stats]
    times = sorted(t for s in stats for t in s.answered_at)
    gaps = sorted(((b - a, a - started) for a, b in itertools.pairwise(times)), reverse=True)
    all_latencies = [v for vs in latencies.values() for v in vs]
    after = [(t, v) for t, v in samples if t >= args.warmup_seconds]
    rss = [v for _, v in samples]
    slope = slope_per_minute(after)

    cmd = "    .venv/bin/python bench/bench_soak.py " + " ".join(sys.argv[1:])
    print("Command:\n\n" + cmd + "\n")
    print(
        f"Server: {info.model_name}, device {info.device}, idempotency keys remembered "
        f"{info.limits.idempotency_keys_remembered}; {args.streams} streams x {args.window} in flight, "
        f"{elapsed:.0f} s\n"
    )
    rows = [
        (
            "requests sent",
            f"{total_sent} (forward_backward {sent['forward_backward']}, forward {sent['forward']}, "
            f"optim_step {sent['optim_step']}, same-key retries {retries})",
        ),
        ("answers received", str(total_answers)),
        ("throughput", f"{total_answers / elapsed:.1f} answers/s"),
        ("lost answers", str(lost)),
        ("duplicated answers", str(duplicated)),
        ("answers to unknown ids / of the wrong kind", f"{unexpected} / {wrong_kind}"),
        ("error answers", str(dict(errors)) if errors else "0"),
        ("retries answered with the original answer", f"{retries - len(mismatches)} / {retries}"),
        ("streams ended", str(dict(final_codes))),
        ("answers per stream min / max", f"{min(per_stream)} / {max(per_stream)}"),
        (
            "latency p50 / p99 / max (all ops)",
            f"{1000 * pct(all_latencies, 0.5):.0f} / "
            f"{1000 * pct(all_latencies, 0.99):.0f} / {1000 * max(all_latencies):.0f} ms",
        ),
        ("longest pauses with no answer on any stream", ", ".join(f"{g:.1f} s at +{at:.0f} s" for g, at in gaps[:3])),
        (
            "latency p50 / p99 (forward_backward)",
            f"{1000 * pct(latencies['forward_backward'], 0.5):.0f} / "
            f"{1000 * pct(latencies['forward_backward'], 0.99):.0f} ms",
        ),
        (
            "latency p50 / p99 (optim_step)",
            f"{1000 * pct(latencies['optim_step'], 0.5):.0f} / {1000 * pct(latencies['optim_step'], 0.99):.0f} ms",
        ),
        ("server RSS start / end / max", f"{rss[0]:.1f} / {rss[-1]:.1f} / {max(rss):.1f} MiB"),
        (f"RSS slope after {args.warmup_seconds:.0f} s warm-up", f"{slope:+.2f} MiB/min ({len(after)} samples)"),
        ("cispo_inflight_requests after the load", f"{inflight:g}" if isinstance(inflight, float) else str(inflight)),
        ("server exit code after SIGTERM", str(rc)),
    ]
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("\nRSS samples (s, MiB): " + ", ".join(f"({t:.0f}, {v:.1f})" for t, v in samples))

    failures = []
    if lost:
        failures.append(f"{lost} lost answers")
    if duplicated:
        failures.append(f"{duplicated} duplicated answers")
    if unexpected or wrong_kind:
        failures.append(f"{unexpected} answers to unknown ids, {wrong_kind} of the wrong kind")
    if errors:
        failures.append(f"error answers: {dict(errors)}")
    if mismatches:
        failures.append(f"{len(mismatches)} same-key retries answered differently, e.g. {mismatches[:3]}")
    if set(final_codes) != {"OK"}:
        failures.append(f"streams ended with {dict(final_codes)}")
    if inflight != 0:
        failures.append(f"cispo_inflight_requests is {inflight} after the load")
    if rc != 0:
        failures.append(f"server exit code {rc}")
    if "Traceback" in log:
        failures.append("the server logged a traceback")
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1
    print("\nOK: no lost or duplicated answers; in-flight gauge back to 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
