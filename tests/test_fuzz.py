"""Differential fuzzing of a real server, plus the exactly-once and drain cases.

Two real servers run the embedded model from the same initial weights: the "fuzzed" one and the
"twin". A fixed (seeded) sequence of good operations goes to both; thousands of bad messages
(random bytes on every RPC, truncated and bit-flipped serialisations, wrong wire types, another
RPC's message, bodies over the size limit, mutated fields, AdamParams extremes, bad state names;
stream chaos: corrupt items among good ones, items with no op, duplicated request ids, an item
over the limit right after a good forward_backward, client cancels) go to the fuzzed one only, and
some good operations are retried with their idempotency key on the fuzzed one. Then:

- no answer is UNKNOWN or INTERNAL, and every bad message gets a code of the set expected for it;
- the good operations get bit-identical answers from both servers, and at the end both save a
  state whose model and optimizer tensors are bit-identical (so no bad message changed anything);
- the fuzzed server is still SERVING, logged no traceback, and `cispo_inflight_requests` is 0.

A per-class tally (messages tried, codes received) is printed (`pytest -s`) and written as JSON
to $CISPO_FUZZ_REPORT when set (with the violations, and the fuzzed server's log beside it). $CISPO_FUZZ_SEED and $CISPO_FUZZ_ROUNDS change the traffic.
When the two servers diverge (a bad message was applied), the divergence is reported with the
suspects and the fuzzed server is re-synchronised from the twin, so one bug does not hide others.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import fuzz_messages as fm
import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.numpy import load_file
from server_process import ServerProcess

from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

SEED = int(os.environ.get("CISPO_FUZZ_SEED", "20251125"))
ROUNDS = int(os.environ.get("CISPO_FUZZ_ROUNDS", "60"))
MAX_MESSAGE_BYTES = 1 << 20
FLAGS = ("--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-tokens-per-request", "4096")
CALL_TIMEOUT = 30.0  # a call that takes longer counts as a hang
LIMIT_NAMES = ("max_message_bytes", str(MAX_MESSAGE_BYTES))
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
ERROR_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|\bcode=(?!OK\b)")


def _identity(b: bytes) -> bytes:
    return b


def _code_name(code: int) -> str:
    return CODE_NAMES.get(code, code_pb2.Code.Name(code) if code in code_pb2.Code.values() else str(code))


def det(msg) -> bytes:
    """`msg` serialised, without its run's incarnation: each server makes its own (step and
    accumulated must agree)."""
    if "version" in msg.DESCRIPTOR.fields_by_name and msg.version.incarnation:
        msg = type(msg).FromString(msg.SerializeToString())
        msg.version.ClearField("incarnation")
    return msg.SerializeToString(deterministic=True)


class Side:
    """One server and its connections: typed stub, raw byte-level callables, health."""

    def __init__(self, name: str, proc: ServerProcess, checkpoint_dir: Path):
        self.name, self.proc, self.dir = name, proc, checkpoint_dir
        self.channel = grpc.insecure_channel(
            proc.address,
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                ("grpc.max_metadata_size", 1 << 20),
            ],
        )
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.raw = {
            m: self.channel.unary_unary(
                fm.SERVICE + m, request_serializer=_identity, response_deserializer=fm.RESPONSE_TYPES[m].FromString
            )
            for m in fm.UNARY
        }
        self.raw_stream = self.channel.stream_stream(
            fm.SERVICE + "Stream", request_serializer=_identity, response_deserializer=pb.StreamResponse.FromString
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call(self, method: str, msg, timeout: float = CALL_TIMEOUT):
        """(code name, response or None, details)."""
        body = msg if isinstance(msg, bytes) else msg.SerializeToString()
        try:
            return "OK", self.raw[method](body, timeout=timeout), ""
        except grpc.RpcError as exc:
            return exc.code().name, None, exc.details() or ""

    def ok(self, method: str, msg, timeout: float = CALL_TIMEOUT):
        code, response, details = self.call(method, msg, timeout)
        assert code == "OK", f"{self.name} {method}: {code} {details[:300]}"
        return response

    def stream(self, items: list, timeout: float = CALL_TIMEOUT):
        """(answers, final code name, details) of one Stream carrying `items` (bytes or messages)."""
        bodies = [i if isinstance(i, bytes) else i.SerializeToString() for i in items]
        answers = []
        try:
            for answer in self.raw_stream(iter(bodies), timeout=timeout):
                answers.append(answer)
            return answers, "OK", ""
        except grpc.RpcError as exc:
            return answers, exc.code().name, exc.details() or ""

    def metric(self, name: str) -> float | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.proc.metrics_port}/metrics", timeout=10).read().decode()
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def wait_inflight(self, at_least: float | None = None, zero: bool = False, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric("cispo_inflight_requests")
            if (zero and value == 0) or (at_least is not None and value is not None and value >= at_least):
                return value
            if time.monotonic() > deadline:
                return value
            time.sleep(0.02)

    def serving(self) -> list[str]:
        return [
            health_pb2.HealthCheckResponse.ServingStatus.Name(
                self.health.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status
            )
            for s in ("", "cispo.v1.TrainingService")
        ]


class Pair:
    def __init__(self, fuzzed: Side, twin: Side):
        self.fuzzed, self.twin = fuzzed, twin

    def sync(self, name: str) -> None:
        """Make the fuzzed server's state (weights, moments, step; no gradient) the twin's."""
        self.twin.ok("SaveState", pb.SaveStateRequest(name=name))
        shutil.rmtree(self.fuzzed.dir / name, ignore_errors=True)
        shutil.copytree(self.twin.dir / name, self.fuzzed.dir / name)
        for side in (self.fuzzed, self.twin):
            side.ok("LoadState", pb.LoadStateRequest(name=name, with_optimizer=True))


def _start(tmp: Path, name: str, out: dict) -> None:
    (tmp / name).mkdir()
    out[name] = ServerProcess(*FLAGS, checkpoint_dir=tmp / name)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    procs: dict = {}
    threads = [threading.Thread(target=_start, args=(tmp, n, procs)) for n in ("fuzzed", "twin")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(procs) != 2:
        for p in procs.values():
            p.kill()
        pytest.fail("a server did not start")
    p = Pair(Side("fuzzed", procs["fuzzed"], tmp / "fuzzed"), Side("twin", procs["twin"], tmp / "twin"))
    p.twin.ok("SaveState", pb.SaveStateRequest(name="init"))  # the fresh weights, for later tests
    shutil.copytree(p.twin.dir / "init", p.fuzzed.dir / "init")
    yield p
    for side in (p.fuzzed, p.twin):
        side.channel.close()
        if side.proc.proc.poll() is None:
            try:
                side.proc.terminate(30)
            except Exception:
                side.proc.kill()


# --- the differential fuzz --------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, pair: Pair, seed: int):
        self.pair, self.f, self.t = pair, pair.fuzzed, pair.twin
        self.rng = random.Random(seed)
        self.ctx = fm.Context(saved={"init"}, max_message_bytes=MAX_MESSAGE_BYTES)
        self.tally: dict[str, dict] = {}
        self.violations: list[dict] = []
        self.suspects: list[str] = []  # bad messages answered OK by a mutating operation
        self.diverged = False
        self.resyncs = 0
        self.good_ops = 0
        self.bad_sent = 0
        self.undecodable = 0

    # -- bookkeeping --

    def count(self, cls: str, kind: str, code: str | None) -> None:
        entry = self.tally.setdefault(
            cls, {"tried": 0, "skipped_parsed": 0, "codes": collections.Counter(), "kinds": collections.Counter()}
        )
        if code is None:
            entry["skipped_parsed"] += 1
            return
        entry["tried"] += 1
        entry["codes"][code] += 1
        entry["kinds"][kind] += 1

    def violation(self, cls: str, kind: str, where: str, problem: str, details: str = "", body: bytes = b"") -> None:
        self.violations.append(
            dict(
                cls=cls,
                kind=kind,
                where=where,
                problem=problem,
                details=details[:300],
                body_hex=body[:96].hex(),
                body_len=len(body),
            )
        )

    def judge(self, bad: fm.BadMessage, code: str, details: str, where: str) -> None:
        """Check one bad message's answer against the spec."""
        self.count(bad.cls, bad.kind, code)
        self.bad_sent += 1
        if bad.checks.get("type_name"):
            self.undecodable += 1
        problems = []
        if code in fm.NEVER:
            problems.append(f"got {code}")
        elif code not in bad.expected:
            problems.append(f"expected {'/'.join(sorted(bad.expected))}, got {code}")
        if code == fm.IA and bad.checks.get("type_name") and bad.checks["type_name"] not in details:
            problems.append(f"INVALID_ARGUMENT does not name the message type {bad.checks['type_name']}")
        echo = bad.checks.get("no_echo")
        if echo and (echo in details or len(details) > 2048):
            problems.append(f"a {len(echo)}-character value is echoed: message of {len(details)} characters")
        if code == fm.RE and bad.checks.get("limit") and bad.checks["limit"] not in details:
            problems.append(f"RESOURCE_EXHAUSTED does not name the limit {bad.checks['limit']}")
        if code == fm.RE and bad.checks.get("limit_any") and not any(n in details for n in bad.checks["limit_any"]):
            problems.append(f"RESOURCE_EXHAUSTED does not name the limit ({' or '.join(bad.checks['limit_any'])})")
        for p in problems:
            self.violation(bad.cls, bad.kind, where, p, details, bad.body)
        if code == "OK" and "OK" not in bad.expected:
            self.suspects.append(f"{bad.cls}/{bad.kind} on {where} answered OK")

    # -- bad traffic --

    def burst(self, n: int) -> None:
        """n bad unary messages to the fuzzed server, all in flight together."""
        bads = []
        for _ in range(n):
            cls, bad = fm.bad_unary(self.rng, self.ctx)
            if bad is None:
                self.count(cls, "", None)
            else:
                bads.append(bad)
        futures = [self.f.raw[b.method].future(b.body, timeout=CALL_TIMEOUT) for b in bads]
        for bad, fut in zip(bads, futures):
            try:
                fut.result()
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            self.judge(bad, code, details, bad.method)
        self.check_alive()

    def check_alive(self) -> None:
        rc = self.f.proc.proc.poll()
        if rc is not None:
            self.violation(
                "server", "crash", "process", f"the fuzzed server exited with {rc}", self.f.proc.log()[-2000:]
            )
            raise _Crashed()

    def chaos_stream(self, good: tuple[str, object] | None = None, oversize: bool = False):
        """One Stream on the fuzzed server: corrupt items, items with no op, duplicated request ids,
        bad operations, and good read-only items (forward, get_info) whose answers must equal the
        twin's; `good` = (op, message) adds one good item (the twin runs it too, in stream order);
        `oversize` puts an item over the message limit right after it. Returns (the fuzzed server's
        answer to the good item or None, the twin's answer)."""
        rng = self.rng
        items: list[tuple[bytes, dict]] = []
        dup_id = f"dup-{rng.randrange(1000)}"

        def rid():
            return dup_id if rng.random() < 0.25 else f"c{rng.randrange(10**6)}"

        for _ in range(rng.randint(1, 3)):  # good forwards (the twin answers them below, in stream order)
            msg = fm.good_batch(rng)
            r = rid()
            items.append(
                (
                    fm.stream_item("forward", r, msg).SerializeToString(),
                    dict(
                        want="result",
                        op="forward",
                        twin=("Forward", msg),
                        rid=r,
                        cls="stream_chaos",
                        kind="good_forward",
                    ),
                )
            )
        for _ in range(rng.randint(0, 2)):  # get_info
            r = rid()
            items.append(
                (
                    fm.stream_item("get_info", r, pb.GetInfoRequest()).SerializeToString(),
                    dict(
                        want="result",
                        op="get_info",
                        twin=("GetInfo", pb.GetInfoRequest()),
                        rid=r,
                        cls="stream_chaos",
                        kind="good_get_info",
                    ),
                )
            )
        for _ in range(rng.randint(2, 6)):  # corrupt items
            cls = rng.choice(fm.BYTE_CLASSES)
            body = fm.corrupt(rng, cls, "Stream", self.ctx)
            routed = fm.route("Stream", body, self.ctx)
            if routed is None:
                self.count(f"stream_{cls}", "", None)
                continue
            _, expected, checks, body = routed
            items.append(
                (
                    body,
                    dict(
                        want="error" if expected == {fm.IA} else "any",
                        codes=expected,
                        checks=checks,
                        rid=None,
                        cls=f"stream_{cls}",
                        kind="item",
                    ),
                )
            )
        for _ in range(rng.randint(0, 2)):  # no op
            r = rid()
            items.append(
                (
                    pb.StreamRequest(request_id=r).SerializeToString(),
                    dict(want="error", codes={fm.IA}, checks={}, rid=r, cls="stream_chaos", kind="no_op"),
                )
            )
        for _ in range(rng.randint(1, 4)):  # bad operations
            r = rid()
            choice = rng.random()
            if choice < 0.7:
                kind, _, msg, expected, checks = fm.mutated_batch(rng)
                op = "forward" if checks.get("read_only") else rng.choice(("forward_backward", "forward"))
                item = fm.stream_item(op, r, msg)
            elif choice < 0.85:
                kind, fields = rng.choice(fm.ADAM_INVALID)
                item = fm.stream_item("optim_step", r, pb.OptimStepRequest(adam_params=pb.AdamParams(**fields)))
                expected, checks = {fm.IA}, {}
            else:
                kind, name = rng.choice(fm.BAD_NAMES)
                op = rng.choice(("save_state", "load_state"))
                inner = pb.SaveStateRequest(name=name) if op == "save_state" else pb.LoadStateRequest(name=name)
                item = fm.stream_item(op, r, inner)
                expected, checks = {fm.IA}, ({"no_echo": name} if len(name) == fm.LONG else {})
            items.append(
                (
                    item.SerializeToString(),
                    dict(
                        want="error" if fm.OK not in expected else "any",
                        codes=set(expected),
                        checks=checks,
                        rid=r,
                        cls="stream_chaos",
                        kind=f"bad:{kind}",
                    ),
                )
            )
        rng.shuffle(items)
        good_index = None
        if good is not None:
            op, msg = good
            good_index = rng.randrange(len(items) + 1)
            items.insert(
                good_index,
                (
                    fm.stream_item(op, "the-good-one", msg).SerializeToString(),
                    dict(
                        want="result",
                        op=op,
                        twin=(fm.OP_METHOD[op], msg),
                        rid="the-good-one",
                        cls="stream_chaos",
                        kind=f"good_{op}",
                        the_good_one=True,
                    ),
                ),
            )
        oversize_index = None
        if oversize:
            oversize_index = (good_index if good_index is not None else -1) + 1
            big = pb.StreamRequest(
                request_id="oversize",
                forward=pb.ForwardBackwardInput(
                    data=[
                        pb.Datum(
                            model_input=pb.Tensor(
                                dtype=pb.DTYPE_INT64, raw_data=bytes(MAX_MESSAGE_BYTES + 8 * rng.randrange(1, 50000))
                            )
                        )
                    ]
                ),
            )
            items.insert(
                oversize_index,
                (
                    big.SerializeToString(),
                    dict(
                        want="error",
                        codes={fm.RE},
                        checks={"limit_any": LIMIT_NAMES},
                        rid="oversize",
                        cls="stream_oversize",
                        kind="oversize_item",
                    ),
                ),
            )
        # The twin runs the good items in stream order (so a good optim_step inside the stream is
        # seen by the forwards after it); bad items go to the fuzzed server only.
        twin_good = None
        for _, exp in items:
            if "twin" in exp:
                exp["response"] = self.t.ok(*exp["twin"])
                if exp.get("the_good_one"):
                    twin_good = exp["response"]
        answers, code, details = self.f.stream([b for b, _ in items])
        good_answer = None
        for i, (body, exp) in enumerate(items):
            where = f"Stream item {i}/{len(items)}"
            if i >= len(answers):
                if oversize and i >= oversize_index and code == fm.RE and any(n in details for n in LIMIT_NAMES):
                    self.count(exp["cls"], exp["kind"], "STREAM_ENDED_" + code)
                    continue
                self.count(exp["cls"], exp["kind"], "NO_ANSWER")
                if oversize and i < oversize_index:
                    self.violation(
                        "stream_oversize",
                        exp["kind"],
                        where,
                        f"an item sent before the oversize item got no answer: the stream ended with "
                        f"{code} after {len(answers)} answers (oversize item at {oversize_index})",
                        details,
                        body,
                    )
                else:
                    self.violation(
                        exp["cls"],
                        exp["kind"],
                        where,
                        f"no answer: the stream ended with {code} after {len(answers)} of {len(items)} answers",
                        details,
                        body,
                    )
                continue
            a = answers[i]
            result = a.WhichOneof("result")
            got = _code_name(a.error.code) if result == "error" else "OK"
            msgtext = a.error.message if result == "error" else ""
            if exp["want"] == "result":
                self.count(exp["cls"], exp["kind"], got)
                if result != exp["op"] or a.request_id != exp["rid"]:
                    self.violation(
                        exp["cls"],
                        exp["kind"],
                        where,
                        f"expected a {exp['op']} answer to {exp['rid']!r}, got {result} to {a.request_id!r}"
                        + (f" ({got})" if result == "error" else ""),
                        msgtext,
                        body,
                    )
                elif (
                    not exp.get("the_good_one")
                    and not self.diverged
                    and det(getattr(a, result)) != det(exp["response"])
                ):
                    self.violation("differential", exp["kind"], where, "answer differs from the twin's", "", body)
                if exp.get("the_good_one"):
                    good_answer = a
                continue
            bad = fm.BadMessage(exp["cls"], exp["kind"], "Stream", body, frozenset(exp["codes"]), exp["checks"])
            if exp["rid"] is not None and a.request_id != exp["rid"]:
                self.violation(
                    exp["cls"], exp["kind"], where, f"answer tagged {a.request_id!r}, expected {exp['rid']!r}", "", body
                )
            if exp["want"] == "error" and result != "error":
                self.count(exp["cls"], exp["kind"], "OK")
                self.violation(exp["cls"], exp["kind"], where, f"expected an error answer, got {result}", "", body)
                self.suspects.append(f"{exp['cls']}/{exp['kind']} in a Stream answered {result}")
                continue
            self.judge(bad, got, msgtext, where)
        if len(answers) > len(items):
            self.violation("stream_chaos", "extra", "Stream", f"{len(answers)} answers to {len(items)} items")
        if code != "OK" and not (oversize and code == fm.RE):
            self.violation("stream_chaos", "stream", "Stream", f"the stream ended with {code}", details)
        self.check_alive()
        return good_answer, twin_good

    def cancels(self) -> None:
        """Client cancels: unary Forward calls and a Stream of forwards, cut off mid-way."""
        rng = self.rng
        big = fm.good_batch(rng, max_datums=3, min_len=900, max_len=1300)
        for _ in range(2):
            fut = self.f.raw["Forward"].future(big.SerializeToString(), timeout=CALL_TIMEOUT)
            time.sleep(rng.uniform(0.0, 0.05))
            fut.cancel()
            self.count("cancel", "unary_forward", "CANCELLED_BY_CLIENT")
        items = [fm.stream_item("forward", f"x{i}", big).SerializeToString() for i in range(4)]
        items.insert(2, b"\xff\xff\xff")
        call = self.f.raw_stream(iter(items), timeout=CALL_TIMEOUT)
        try:
            first = next(call)
            if first.WhichOneof("result") != "forward":
                self.violation("cancel", "stream", "Stream", f"first answer is {first.WhichOneof('result')}")
        except grpc.RpcError as exc:
            self.violation(
                "cancel", "stream", "Stream", f"stream failed before the cancel: {exc.code().name}", exc.details() or ""
            )
        call.cancel()
        self.count("cancel", "stream_mid_way", "CANCELLED_BY_CLIENT")
        self.check_alive()

    # -- good traffic --

    def good(self, op: str, msg, via: str = "unary"):
        """One good operation on both servers; their answers must be identical."""
        self.good_ops += 1
        method = fm.OP_METHOD[op]
        if via == "unary":
            fcode, fres, fdet = self.f.call(method, msg)
        elif via == "stream":
            answers, code, fdet = self.f.stream([fm.stream_item(op, "g", msg)])
            fres, fcode = None, code if code != "OK" else "NO_ANSWER"
            if answers:
                a = answers[0]
                fres = getattr(a, op) if a.WhichOneof("result") == op else None
                fcode = "OK" if fres is not None else _code_name(a.error.code)
                fdet = a.error.message
        if via in ("unary", "stream"):
            tcode, tres, tdet = self.t.call(method, msg)
            assert tcode == "OK", f"the twin failed a good {op}: {tcode} {tdet[:300]}"
        else:  # chaos / oversize: the good item inside a chaos stream
            a, tres = self.chaos_stream(good=(op, msg), oversize=via == "oversize")
            fres = getattr(a, op) if a is not None and a.WhichOneof("result") == op else None
            fcode = "OK" if fres is not None else ("NO_ANSWER" if a is None else _code_name(a.error.code))
            fdet = "" if a is None else a.error.message
        self.count("good", f"{op}:{via}", fcode)
        if fcode != "OK":
            self.violation(
                "good", f"{op}:{via}", method, f"a good {op} failed with {fcode}", fdet, msg.SerializeToString()
            )
            self.diverged = True
            return tres
        if getattr(msg, "idempotency_key", "") and self.rng.random() < 0.35:
            # A client retry: the same request with the same key, answered with the original
            # answer and not applied again (a second application shows in the twin comparison).
            rcode, rres, rdet = self.f.call(method, msg)
            self.count("retry_same_key", op, rcode)
            if rcode != "OK" or det(rres) != det(fres):
                self.violation(
                    "retry_same_key",
                    op,
                    method,
                    f"a retry with the same key got {rcode} {_short(rres)}, the original {_short(fres)}",
                    rdet,
                    msg.SerializeToString(),
                )
        same = (
            (det(fres) == det(tres))
            if op != "save_state"
            else ((fres.name, fres.step, Path(fres.path).name) == (tres.name, tres.step, Path(tres.path).name))
        )
        if not same:
            self.violation(
                "differential",
                f"{op}:{via}",
                method,
                f"answers differ: fuzzed {_short(fres)} vs twin {_short(tres)}; "
                f"suspects since the last sync: {self.suspects[-8:] or 'none'}",
            )
            self.diverged = True
        return tres

    def resync(self) -> None:
        if self.diverged:
            self.resyncs += 1
            name = f"resync-{self.resyncs}"
            self.pair.sync(name)
            self.ctx.saved.add(name)
            self.diverged = False
        self.suspects.clear()

    # -- the run --

    def run(self, rounds: int) -> None:
        rng = self.rng
        for r in range(rounds):
            via = rng.choice(("unary", "unary", "stream", "chaos", "chaos", "oversize") if r % 4 else ("oversize",))
            self.good(
                "forward_backward", fm.good_batch(rng, idempotency_key=fm.key(rng) if rng.random() < 0.5 else ""), via
            )
            self.ctx.has_grad = True
            self.burst(rng.randint(20, 30))
            self.good("forward", fm.good_batch(rng), rng.choice(("unary", "stream", "chaos")))
            if rng.random() < 0.5:
                self.good("forward_backward", fm.good_batch(rng), rng.choice(("unary", "stream", "chaos")))
            self.burst(rng.randint(20, 30))
            if r % 3 == 1:
                self.cancels()
            self.chaos_stream()
            self.good(
                "optim_step",
                pb.OptimStepRequest(
                    adam_params=fm.good_adam(rng), idempotency_key=fm.key(rng) if rng.random() < 0.5 else ""
                ),
                rng.choice(("unary", "unary", "stream", "chaos")),
            )
            self.ctx.has_grad = False
            self.resync()
            self.burst(rng.randint(20, 30))
            if r % 6 == 5:
                name = f"good-{r}"
                self.good("save_state", pb.SaveStateRequest(name=name, idempotency_key=fm.key(rng)), "unary")
                self.ctx.saved.add(name)
            if r % 8 == 7:
                name = rng.choice(sorted(n for n in self.ctx.saved if n.startswith("good-")))
                self.good("load_state", pb.LoadStateRequest(name=name, with_optimizer=rng.random() < 0.5), "unary")
                self.resync()

    def report(self) -> dict:
        classes = {}
        for cls, e in sorted(self.tally.items()):
            classes[cls] = {
                "tried": e["tried"],
                "skipped_parsed": e["skipped_parsed"],
                "codes": dict(e["codes"]),
                "kinds": dict(e["kinds"]),
            }
        return classes


class _Crashed(Exception):
    pass


def _short(msg) -> str:
    if msg is None:
        return "None"
    text = str(msg).replace("\n", " ")
    return text if len(text) < 200 else text[:200] + "..."


def _grouped(violations: list[dict]) -> str:
    groups: dict = collections.OrderedDict()
    for v in violations:
        groups.setdefault(
            (v["cls"], v["kind"], v["problem"] if len(v["problem"]) < 120 else v["problem"][:120]), []
        ).append(v)
    lines = []
    for (cls, kind, problem), vs in groups.items():
        v = vs[0]
        lines.append(
            f"- [{cls}/{kind}] x{len(vs)} at {v['where']}: {problem}\n"
            f"    e.g. details={v['details'][:200]!r} body({v['body_len']} B)={v['body_hex'][:96]}"
        )
    return "\n".join(lines)


def _state_tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in ("model.safetensors", "optimizer.safetensors"):
        for k, v in load_file(str(directory / f)).items():
            out[f"{f}:{k}"] = v
    return out


@pytest.mark.timeout(400)
def test_fuzz_differential(pair):
    f, t = pair.fuzzed, pair.twin
    fuzzer = Fuzzer(pair, SEED)
    log_lines_before = len(f.proc.lines)
    started = time.monotonic()
    crashed = False
    try:
        fuzzer.run(ROUNDS)
    except _Crashed:
        crashed = True
    duration = time.monotonic() - started
    problems = []
    if not crashed:
        try:
            serving = f.serving()
        except grpc.RpcError as exc:
            serving = [f"health check failed: {exc.code().name}"]
        if serving != ["SERVING", "SERVING"]:
            problems.append(f"health of the fuzzed server: {serving}")
        # The end state: both save it; every tensor is bit-identical and finite.
        fs = f.call("SaveState", pb.SaveStateRequest(name="final"))
        ts = t.ok("SaveState", pb.SaveStateRequest(name="final"))
        if fs[0] != "OK" or (fs[1].step, fs[1].name) != (ts.step, ts.name):
            problems.append(f"final save_state: fuzzed {fs[0]} {_short(fs[1])} {fs[2][:200]} vs twin {_short(ts)}")
        else:
            ft, tt = _state_tensors(f.dir / "final"), _state_tensors(t.dir / "final")
            if ft.keys() != tt.keys():
                problems.append(f"saved tensors differ in names: {sorted(set(ft) ^ set(tt))[:5]}")
            differing = [
                k for k in ft.keys() & tt.keys() if ft[k].dtype != tt[k].dtype or ft[k].tobytes() != tt[k].tobytes()
            ]
            if differing:
                problems.append(f"{len(differing)} saved tensors are not bit-identical, e.g. {sorted(differing)[:4]}")
            nonfinite = [k for k, v in ft.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
            if nonfinite:
                problems.append(f"non-finite saved tensors on the fuzzed server: {nonfinite[:4]}")
        # No file was created by a bad request (listings, hidden temporaries included, agree).
        fl, tl = sorted(os.listdir(f.dir)), sorted(os.listdir(t.dir))
        if fl != tl:
            problems.append(
                f"checkpoint directories differ: only fuzzed {sorted(set(fl) - set(tl))[:6]}, "
                f"only twin {sorted(set(tl) - set(fl))[:6]}"
            )
        inflight = f.wait_inflight(zero=True)
        if inflight != 0:
            problems.append(f"cispo_inflight_requests is {inflight} on the idle fuzzed server")
    log = "".join(f.proc.lines[log_lines_before:])
    log_lines = log.splitlines()
    if "Traceback" in log:
        problems.append(
            f"the fuzzed server logged {log.count('Traceback')} tracebacks, e.g.:\n"
            + log[log.index("Traceback") - 300 : log.index("Traceback") + 600]
        )
    # "At most one short line per error, rate-limited": the error lines (level WARNING or above, or
    # an access-log line with a code other than OK) are at most 500 characters and, over thousands
    # of bad messages, at most one per ten of them.
    error_lines = [line for line in log_lines if ERROR_LINE.search(line)]
    long_lines = [line for line in error_lines if len(line) > 500]
    if long_lines:
        problems.append(f"{len(long_lines)} error log lines over 500 characters, e.g. {long_lines[0][:500]!r}")
    if len(error_lines) > max(20, fuzzer.bad_sent // 10):
        problems.append(
            f"{len(error_lines)} error lines in the server log for {fuzzer.bad_sent} bad messages "
            f"({fuzzer.undecodable} undecodable): not rate-limited, e.g. {error_lines[-1][:300]!r}"
        )
    report = {
        "seed": SEED,
        "rounds": ROUNDS,
        "duration_s": round(duration, 1),
        "good_ops": fuzzer.good_ops,
        "bad_messages": fuzzer.bad_sent,
        "undecodable": fuzzer.undecodable,
        "resyncs": fuzzer.resyncs,
        "server_log_lines": len(log_lines),
        "server_error_log_lines": len(error_lines),
        "violations": len(fuzzer.violations),
        "end_problems": problems,
        "classes": fuzzer.report(),
    }
    print("\nfuzz tally:", json.dumps(report, indent=1))
    if os.environ.get("CISPO_FUZZ_REPORT"):
        Path(os.environ["CISPO_FUZZ_REPORT"]).write_text(
            json.dumps({**report, "violation_list": fuzzer.violations[:400]}, indent=1)
        )
        Path(os.environ["CISPO_FUZZ_REPORT"] + ".server.log").write_text(f.proc.log())
    failures = []
    if fuzzer.violations:
        failures.append(f"{len(fuzzer.violations)} spec violations:\n{_grouped(fuzzer.violations)}")
    failures += problems
    assert not failures, "\n".join(failures)


# --- exactly once ------------------------------------------------------------------------------------


def _optim_both(pair, lr: float = 1e-3):
    req = pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=lr))
    return pair.fuzzed.ok("OptimStep", req), pair.twin.ok("OptimStep", req)


@pytest.mark.timeout(120)
def test_idempotent_retry_is_answered_with_the_original_and_applied_once(pair):
    rng = random.Random(SEED + 1)
    pair.sync("idem-base")
    f, t = pair.fuzzed, pair.twin
    fb = fm.good_batch(rng, "cispo", idempotency_key=fm.key(rng), min_len=8)
    first = f.ok("ForwardBackward", fb)
    retry = f.ok("ForwardBackward", fb)
    answers, code, details = f.stream([fm.stream_item("forward_backward", "again", fb)])
    reference = t.ok("ForwardBackward", fb)
    assert det(first) == det(reference)
    assert det(retry) == det(first), "a retry with the same key got a different answer"
    assert code == "OK" and answers and answers[0].WhichOneof("result") == "forward_backward", (code, details, answers)
    assert det(answers[0].forward_backward) == det(first), "a Stream retry with the same key got a different answer"
    step = pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-3), idempotency_key=fm.key(rng))
    fo, to = f.ok("OptimStep", step), t.ok("OptimStep", step)
    assert fo.grad_norm == to.grad_norm, (
        f"grad_norm {fo.grad_norm} vs twin {to.grad_norm}: the forward_backward was applied "
        f"{fo.grad_norm / to.grad_norm:.3g}x"
        if to.grad_norm
        else ""
    )
    fo2 = f.ok("OptimStep", step)
    assert det(fo2) == det(fo), f"optim_step retry: {_short(fo2)} vs original {_short(fo)}"
    assert f.ok("GetInfo", pb.GetInfoRequest()).step == t.ok("GetInfo", pb.GetInfoRequest()).step, (
        "an optim_step retried with its key stepped twice"
    )
    save = pb.SaveStateRequest(name="idem-save", idempotency_key=fm.key(rng))
    s1, s2 = f.ok("SaveState", save), f.ok("SaveState", save)
    assert det(s1) == det(s2)
    load = pb.LoadStateRequest(name="idem-save", with_optimizer=True, idempotency_key=fm.key(rng))
    l1, l2 = f.ok("LoadState", load), f.ok("LoadState", load)
    assert det(l1) == det(l2)
    probe = fm.good_batch(rng)
    assert det(f.ok("Forward", probe)) == det(t.ok("Forward", probe))


@pytest.mark.timeout(120)
def test_reusing_a_key_for_a_different_request_is_invalid_argument(pair):
    rng = random.Random(SEED + 2)
    pair.sync("reuse-base")
    f, t = pair.fuzzed, pair.twin
    k = fm.key(rng)
    a = fm.good_batch(rng, "cispo", idempotency_key=k, min_len=5)
    b = fm.good_batch(rng, "cispo", idempotency_key=k, min_len=5)
    f.ok("ForwardBackward", a)
    t.ok("ForwardBackward", a)
    outcomes = {
        "ForwardBackward, other batch": f.call("ForwardBackward", b),
        "Forward, same batch": f.call("Forward", a),
        "OptimStep": f.call("OptimStep", pb.OptimStepRequest(idempotency_key=k)),
        "SaveState": f.call("SaveState", pb.SaveStateRequest(name="reuse-x", idempotency_key=k)),
    }
    answers, code, _ = f.stream([fm.stream_item("forward_backward", "s", b)])
    outcomes["Stream forward_backward, other batch"] = (
        _code_name(answers[0].error.code) if answers and answers[0].HasField("error") else ("OK" if answers else code),
        None,
        answers[0].error.message if answers else "",
    )
    wrong = {what: (c, d[:200]) for what, (c, _, d) in outcomes.items() if c != fm.IA}
    assert not wrong, f"a reused key must be INVALID_ARGUMENT: {wrong}"
    assert not (f.dir / "reuse-x").exists()
    fo, to = _optim_both(pair)
    assert fo.grad_norm == to.grad_norm and fo.step == to.step, (_short(fo), _short(to))
    k2 = fm.key(rng)
    f.ok("OptimStep", pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-3), idempotency_key=k2))
    t.ok("OptimStep", pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-3), idempotency_key=k2))
    c, _, d = f.call(
        "OptimStep", pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-4), idempotency_key=k2)
    )
    assert c == fm.IA, (c, d)
    assert f.ok("GetInfo", pb.GetInfoRequest()).step == t.ok("GetInfo", pb.GetInfoRequest()).step


@pytest.mark.timeout(120)
def test_a_failed_operation_does_not_claim_its_key(pair):
    """A request that failed changed nothing and is not remembered: a later request with its key runs."""
    rng = random.Random(SEED + 9)
    pair.sync("failed-key-base")
    f, t = pair.fuzzed, pair.twin
    k = fm.key(rng)
    _, _, bad, _, _ = fm.mutated_batch(rng, "token_out_of_vocab")
    bad.idempotency_key = k
    assert f.call("ForwardBackward", bad)[0] == fm.IA
    good = fm.good_batch(rng, "cispo", idempotency_key=k, min_len=5)
    first = f.call("ForwardBackward", good)
    assert first[0] == "OK", f"after a failed request with the same key: {first[0]} {first[2][:200]}"
    assert det(first[1]) == det(t.ok("ForwardBackward", good))
    k2 = fm.key(rng)
    refused = f.call(
        "OptimStep",
        pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e38, weight_decay=1e38), idempotency_key=k2),
    )
    assert refused[0] in (fm.FP, fm.IA), refused
    step = pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-3), idempotency_key=k2)
    fo = f.call("OptimStep", step)
    assert fo[0] == "OK", f"after a refused step with the same key: {fo[0]} {fo[2][:200]}"
    to = t.ok("OptimStep", step)
    assert det(fo[1]) == det(to), (_short(fo[1]), _short(to))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["queued", "running"])
def test_cancelled_forward_backward_retried_with_its_key_applies_once(pair, where):
    rng = random.Random(SEED + (3 if where == "queued" else 4))
    pair.sync(f"cancel-base-{where}")
    f, t = pair.fuzzed, pair.twin
    blockers = []
    if where == "queued":  # three long forwards ahead of it in the ordered pipeline
        big = fm.good_batch(rng, "cispo", max_datums=2, min_len=1900, max_len=2000)
        blockers = [f.raw["Forward"].future(big.SerializeToString(), timeout=60) for _ in range(3)]
        f.wait_inflight(at_least=3)
    fb = fm.good_batch(rng, "cispo", idempotency_key=fm.key(rng), max_datums=2, min_len=1500, max_len=2000)
    call = f.stub.ForwardBackward.future(fb, timeout=60)
    f.wait_inflight(at_least=len(blockers) + 1)
    call.cancel()
    retried = f.ok("ForwardBackward", fb, timeout=60)
    for b in blockers:
        b.result()
    reference = t.ok("ForwardBackward", fb, timeout=60)
    assert det(retried) == det(reference)
    fo, to = _optim_both(pair)
    assert fo.grad_norm == to.grad_norm, (
        f"grad_norm {fo.grad_norm} vs twin {to.grad_norm} (ratio {fo.grad_norm / to.grad_norm:.3g}): "
        "the cancelled forward_backward and its retry were not applied exactly once"
    )
    assert f.wait_inflight(zero=True) == 0


@pytest.mark.timeout(120)
def test_oversize_item_after_a_forward_backward_in_one_stream(pair):
    rng = random.Random(SEED + 5)
    pair.sync("oversize-base")
    f, t = pair.fuzzed, pair.twin
    for attempt in range(3):
        fb = fm.good_batch(rng, "cispo", idempotency_key=fm.key(rng))
        big = pb.ForwardBackwardInput(
            data=[pb.Datum(model_input=pb.Tensor(dtype=pb.DTYPE_INT64, raw_data=bytes(MAX_MESSAGE_BYTES + 4096)))]
        )
        items = [
            fm.stream_item("forward_backward", "fb", fb),
            fm.stream_item("forward", "big", big),
            fm.stream_item("get_info", "after", pb.GetInfoRequest()),
        ]
        answers, code, details = f.stream(items)
        reference = t.ok("ForwardBackward", fb)
        assert answers and answers[0].request_id == "fb" and answers[0].WhichOneof("result") == "forward_backward", (
            f"attempt {attempt}: the forward_backward accepted before the oversize item got no answer "
            f"(answers {[a.request_id for a in answers]}, stream ended {code}: {details[:200]})"
        )
        assert det(answers[0].forward_backward) == det(reference)
        if code == "OK":
            assert len(answers) == 3 and answers[1].request_id == "big" and answers[1].HasField("error")
            assert _code_name(answers[1].error.code) == fm.RE
            assert any(n in answers[1].error.message for n in LIMIT_NAMES), answers[1].error.message
            assert answers[2].WhichOneof("result") == "get_info"
        else:
            assert code == fm.RE and any(n in details for n in LIMIT_NAMES), (code, details)
        fo, to = _optim_both(pair)
        assert fo.grad_norm == to.grad_norm, f"attempt {attempt}: grad_norm {fo.grad_norm} vs twin {to.grad_norm}"


@pytest.mark.timeout(120)
def test_symlinks_planted_in_the_checkpoint_dir_are_failed_precondition(pair, tmp_path):
    pair.sync("symlink-base")
    f, t = pair.fuzzed, pair.twin
    outside = tmp_path / "outside"
    shutil.copytree(t.dir / "init", outside / "state")
    before = {p.name: p.read_bytes() for p in (outside / "state").iterdir()}
    (f.dir / "link-to-outside").symlink_to(outside / "state", target_is_directory=True)
    (f.dir / "dangling").symlink_to(tmp_path / "does-not-exist")
    files = f.dir / "linked-files"
    files.mkdir()
    shutil.copy(t.dir / "init" / "manifest.json", files / "manifest.json")
    (files / "model.safetensors").symlink_to("/etc/hostname")
    (files / "optimizer.safetensors").symlink_to(outside / "state" / "optimizer.safetensors")
    try:
        outcomes = {
            f"LoadState {name}": f.call("LoadState", pb.LoadStateRequest(name=name, with_optimizer=True))
            for name in ("link-to-outside", "dangling", "linked-files")
        }
        for name in ("link-to-outside", "dangling"):
            outcomes[f"SaveState {name}"] = f.call("SaveState", pb.SaveStateRequest(name=name))
        wrong = {what: (c, d[:200]) for what, (c, _, d) in outcomes.items() if c != fm.FP}
        assert not wrong, f"a planted symlink must be FAILED_PRECONDITION: {wrong}"
        # Saving over a real state directory whose files are symlinks: refused, or replaced
        # atomically without writing through the links.
        c, _, d = f.call("SaveState", pb.SaveStateRequest(name="linked-files"))
        assert c in (fm.FP, fm.OK), (c, d[:200])
        assert {p.name: p.read_bytes() for p in (outside / "state").iterdir()} == before, "a file outside was changed"
        assert (f.dir / "link-to-outside").is_symlink() and (f.dir / "dangling").is_symlink()
        probe = fm.good_batch(random.Random(SEED + 6))
        assert det(f.ok("Forward", probe)) == det(t.ok("Forward", probe)), "a refused load changed the weights"
        assert f.ok("GetInfo", pb.GetInfoRequest()).step == t.ok("GetInfo", pb.GetInfoRequest()).step
    finally:
        for p in (f.dir / "link-to-outside", f.dir / "dangling"):
            if p.is_symlink():
                p.unlink()
        shutil.rmtree(files, ignore_errors=True)


@pytest.mark.timeout(120)
def test_inflight_gauge_returns_to_zero_after_cancelled_calls(pair):
    rng = random.Random(SEED + 7)
    f = pair.fuzzed
    big = fm.good_batch(rng, "cispo", max_datums=2, min_len=1500, max_len=2000).SerializeToString()
    for i in range(6):
        fut = f.raw["Forward"].future(big, timeout=30)
        time.sleep(0.01 * i)
        fut.cancel()
    for _ in range(3):
        call = f.raw_stream(
            iter(
                [
                    fm.stream_item("forward", str(i), pb.ForwardBackwardInput.FromString(big)).SerializeToString()
                    for i in range(5)
                ]
            ),
            timeout=30,
        )
        next(call)
        call.cancel()
    # A stream that writes 100 requests and never reads its answers (the server's window and
    # queue fill up: back-pressure), then is cancelled.
    small = fm.good_batch(rng, "cispo", max_datums=2, max_len=64)
    call = f.raw_stream(
        iter([fm.stream_item("forward", str(i), small).SerializeToString() for i in range(100)]), timeout=30
    )
    time.sleep(1.0)
    call.cancel()
    value = f.wait_inflight(zero=True, timeout=30)
    assert value == 0, f"cispo_inflight_requests stays at {value} after cancelled calls"
    assert f.serving() == ["SERVING", "SERVING"]


@pytest.mark.timeout(180)
def test_sigterm_drains_a_stream_of_forward_backwards(pair, tmp_path):
    """SIGTERM while 50 forward_backwards are in flight on one Stream: every answer received is
    correct (equal to the twin's, from the same fresh weights), the server exits 0."""
    rng = random.Random(SEED + 8)
    t = pair.twin
    t.ok("LoadState", pb.LoadStateRequest(name="init"))  # the fresh weights and optimizer
    batches = [
        fm.good_batch(rng, "cispo", idempotency_key=fm.key(rng), max_datums=2, min_len=250, max_len=300)
        for _ in range(50)
    ]
    proc = ServerProcess(*FLAGS, "--drain-seconds", "60", checkpoint_dir=tmp_path)
    answered, final = [], None
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stream = channel.stream_stream(
                fm.SERVICE + "Stream", request_serializer=_identity, response_deserializer=pb.StreamResponse.FromString
            )
            items = [fm.stream_item("forward_backward", str(i), b).SerializeToString() for i, b in enumerate(batches)]
            try:
                for answer in stream(iter(items), timeout=120):
                    answered.append(answer)
                    if len(answered) == 3:
                        proc.proc.send_signal(signal.SIGTERM)
            except grpc.RpcError as exc:
                final = exc
        rc = proc.proc.wait(90)
    finally:
        proc.kill()
    assert rc == 0, f"exit code {rc}:\n{proc.log()[-2000:]}"
    assert final is None or final.code() == grpc.StatusCode.UNAVAILABLE, (final.code(), final.details())
    assert [a.request_id for a in answered] == [str(i) for i in range(len(answered))]
    expected = [t.ok("ForwardBackward", b) for b in batches[: len(answered)]]
    for i, (a, e) in enumerate(zip(answered, expected)):
        assert a.WhichOneof("result") == "forward_backward", (i, a.error)
        assert det(a.forward_backward) == det(e), f"answer {i} differs from the twin's"
    assert len(answered) >= 3
    assert "Traceback" not in proc.log()
    m = re.search(r"drained: (\d+) operations accepted, (\d+) completed", proc.log())
    assert m and int(m.group(1)) == int(m.group(2)) == len(answered), (m and m.group(0), len(answered))
