"""The vectorised reader of ForwardBackwardInput (`convert.decode_forward_backward`, which reads
the datums' bytes with array operations) against protobuf: on good, mutated and corrupted bodies
both give the same outcome - undecodable, the same violations in the same order, the same limit,
or the same tensors for every datum (the same values, and floats where protobuf gives floats: a
batch's datums share one dtype per field, the widest they were sent in).

The reference parses the body with protobuf, decodes each tensor with `convert.tensor_to_torch`
and validates a list of Samples; the reader under test is what the servicer runs. Batches of 64
or more datums of one byte size take the reader's template path (one datum read in full, the
others compared with it word by word), so most bodies here are such batches, corrupted in place.
"""

import random

import fuzz_messages as fm
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from cispo.service import convert
from cispo.v1 import datum_reader, tensors
from cispo.v1 import training_pb2 as pb
from cispo.worker import InvalidInput, LimitExceeded
from cispo.worker.batch import Sample
from cispo.worker.losses import get_loss_function
from cispo.worker.validation import validate_batch

BIG = 1 << 30
MAX_SEQUENCE = 64


def _validated(samples, loss_fn: str) -> tuple:
    try:
        loss = get_loss_function(loss_fn or "cispo")
    except InvalidInput:
        loss = get_loss_function("cispo")
    try:
        validate_batch(samples, loss, fm.VOCAB, MAX_SEQUENCE, BIG)
    except InvalidInput as exc:
        return "invalid", [(v.field, v.description) for v in exc.violations]
    except LimitExceeded as exc:
        return "limit", exc.limit, str(exc)
    return "ok", [(s.model_input, dict(s.loss_fn_inputs)) for s in samples]


def reference(body: bytes) -> tuple:
    """(outcome, tokens on the wire): protobuf, then one datum at a time."""
    try:
        msg = pb.ForwardBackwardInput.FromString(body)
    except DecodeError:
        return ("undecodable",), 0
    tokens = sum(tensors.wire_length(d.model_input) for d in msg.data)
    violations = convert.Violations()
    samples = []
    for i, datum in enumerate(msg.data):
        if not datum.HasField("model_input"):
            violations.add(f"data[{i}].model_input", "required")
        model_input = convert.tensor_to_torch(datum.model_input, f"data[{i}].model_input", violations)
        inputs = {}
        for descriptor, tensor in datum.loss_fn_inputs.ListFields():
            value = convert.tensor_to_torch(tensor, f"data[{i}].loss_fn_inputs.{descriptor.name}", violations)
            if value is not None:
                inputs[descriptor.name] = value
        if model_input is not None:
            samples.append(Sample(model_input, inputs))
    if violations:
        return ("invalid", [(v.field, v.description) for v in violations]), tokens
    return _validated(samples, msg.loss_fn), tokens


def vectorised(body: bytes, max_tokens: int = BIG) -> tuple:
    """The servicer's path: the lazy parse, the array reader, validation of the batch as it is."""
    try:
        lazy = convert.LAZY_FORWARD_BACKWARD.FromString(body)
        batch, loss_fn, _ = convert.decode_forward_backward(lazy, BIG, max_tokens)
    except DecodeError:
        return ("undecodable",)
    except InvalidInput as exc:
        return "invalid", [(v.field, v.description) for v in exc.violations]
    except LimitExceeded as exc:
        return "limit", exc.limit, str(exc)
    return _validated(batch, loss_fn)


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != "ok" or b[0] != "ok":
        return a == b
    if len(a[1]) != len(b[1]):
        return False
    for (tokens_a, inputs_a), (tokens_b, inputs_b) in zip(a[1], b[1]):
        pairs = [(tokens_a, tokens_b)] + [(inputs_a[k], inputs_b.get(k)) for k in inputs_a]
        if inputs_a.keys() != inputs_b.keys() or any(
            y is None or x.is_floating_point() != y.is_floating_point() or not torch.equal(x.double(), y.double())
            for x, y in pairs
        ):
            return False
    return True


def check(body: bytes) -> str:
    """Assert both readers agree on `body` (and on its token count); the outcome's kind."""
    expected, tokens = reference(body)
    got = vectorised(body)
    assert _same(got, expected), f"vectorised {str(got)[:600]}\nprotobuf   {str(expected)[:600]}"
    if expected[0] != "undecodable" and tokens:
        limited = vectorised(body, max_tokens=tokens - 1)
        assert limited[:2] == ("limit", "max_tokens_per_request") and f"has {tokens} tokens" in limited[2], limited
    return expected[0]


FORMS = {
    "model_input": fm.INT_FORMS,
    "target_tokens": fm.INT_FORMS,
    "logprobs": fm.FLOAT_FORMS,
    "advantages": fm.FLOAT_FORMS,
    "weights": fm.FLOAT_FORMS,
}


def uniform_batch(rng: random.Random, datums: int) -> tuple[fm.BatchSpec, pb.ForwardBackwardInput]:
    """(spec, message): `datums` datums of one length, each field in one form for all, so that
    (token ids below 128: one-byte varints) every datum has the same byte size."""
    loss_fn = rng.choice(("cispo", "cross_entropy"))
    names = ("model_input", "target_tokens", *fm.REQUIRED[loss_fn])
    forms = {name: rng.choice(FORMS[name]) for name in names}
    shaped = {name: rng.random() < 0.3 for name in names}
    n = rng.randint(1, 6)
    spec, msg = fm.BatchSpec([], loss_fn), pb.ForwardBackwardInput(loss_fn=loss_fn)
    for _ in range(datums):
        values = {}
        for name in names:
            if name in ("model_input", "target_tokens"):
                values[name] = [rng.randrange(128) for _ in range(n)]
            elif name == "logprobs":
                values[name] = [float(np.float32(-rng.uniform(0.1, 8.0))) for _ in range(n)]
            else:
                values[name] = [float(np.float32(rng.uniform(-1, 1))) for _ in range(n)]
        datum = msg.data.add()
        for name, numbers in values.items():
            tensor = datum.model_input if name == "model_input" else getattr(datum.loss_fn_inputs, name)
            fm.write_tensor(tensor, forms[name], numbers, shape=shaped[name])
        spec.datums.append(values)
    return spec, msg


def _datum_spans(body: bytes, msg: pb.ForwardBackwardInput) -> list[tuple[int, int]]:
    """(start, end) of each datum's encoding in `body` (data is field 1 of the request)."""
    spans, at = [], 0
    for datum in msg.data:
        encoded = datum.SerializeToString()
        start = body.index(encoded, at)
        spans.append((start, start + len(encoded)))
        at = start + len(encoded)
    return spans


def corrupt_datums(rng: random.Random, body: bytes, msg: pb.ForwardBackwardInput) -> bytes:
    """1-3 datums' bytes changed in place (same size), anywhere in them: data, tags, lengths."""
    spans = _datum_spans(body, msg)
    out = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        start, end = rng.choice(spans)
        i = rng.randrange(start, end)
        if rng.random() < 0.5:
            out[i] ^= 1 << rng.randrange(8)
        else:
            out[i] = rng.randrange(256)
    return bytes(out)


@pytest.mark.parametrize("seed", range(6))
def test_good_batches_of_every_form_agree(seed):
    rng = random.Random(seed)
    for _ in range(40):
        assert check(fm.good_batch(rng, max_datums=8).SerializeToString()) == "ok"
    for _ in range(8):
        assert check(uniform_batch(rng, rng.randint(64, 90))[1].SerializeToString()) == "ok"


@pytest.mark.parametrize("kind", sorted(fm.FB_MUTATIONS))
def test_mutated_batches_agree(kind):
    rng = random.Random(kind)
    for _ in range(12):
        _, _, msg, _, _ = fm.mutated_batch(rng, kind)
        check(msg.SerializeToString())
        spec, big = uniform_batch(rng, 70)  # the same mutation among many datums of one size
        fm.FB_MUTATIONS[kind](rng, spec, big)
        check(big.SerializeToString())


@pytest.mark.parametrize("seed", range(8))
def test_datums_corrupted_in_place_agree(seed):
    """Same-size corruption inside datums of a uniform batch: what the template path must catch."""
    rng = random.Random(1000 + seed)
    kinds = set()
    for _ in range(60):
        _, msg = uniform_batch(rng, rng.randint(64, 80))
        body = msg.SerializeToString()
        kinds.add(check(corrupt_datums(rng, body, msg)))
    assert {"ok", "invalid"} <= kinds  # the corruption reaches both outcomes


@pytest.mark.parametrize("seed", range(4))
def test_corrupted_bodies_agree(seed):
    """Bit flips, truncations and foreign fields anywhere in the body."""
    rng = random.Random(2000 + seed)
    for _ in range(60):
        msg = uniform_batch(rng, 66)[1] if rng.random() < 0.5 else fm.good_batch(rng, max_datums=8)
        body = msg.SerializeToString()
        cls = rng.choice(("truncated", "bitflip", "wrong_wire_type"))
        check(
            {"truncated": fm._truncate, "bitflip": fm._bitflip, "wrong_wire_type": fm._wrong_wire_type}[cls](rng, body)
        )


def test_datums_protobuf_reads_in_another_form_agree():
    """Encodings protobuf accepts that no serialiser writes, in one datum among many plain ones:
    a tensor field given twice (merged), unpacked int64_data, an unknown field, an id of 2**40."""
    rng = random.Random(7)
    _, msg = uniform_batch(rng, 70)
    body = msg.SerializeToString()
    start, end = _datum_spans(body, msg)[3]
    head = start - 1 - len(fm._varint(end - start))  # datum 3's tag (request field 1) and length
    model_input = msg.data[3].model_input.SerializeToString()
    extras = {
        "model_input twice": b"\x0a" + fm._varint(len(model_input)) + model_input,
        "unknown field 9": b"\x48\x01",
        "unpacked int64_data": b"\x0a\x04\x20\x05\x20\x06",
        "id of 2**40": b"\x0a\x08\x22\x06" + fm._varint(2**40),
    }
    for name, extra in extras.items():
        datum = body[start:end] + extra
        changed = body[:head] + b"\x0a" + fm._varint(len(datum)) + datum + body[end:]
        assert len(pb.ForwardBackwardInput.FromString(changed).data) == 70, name
        check(changed)


def check_typed_batches(rng: random.Random, batches: int, datums: tuple[int, int], n: tuple[int, int], ids) -> None:
    """`batches` cispo batches of typed tensors (int64_data, float_data), each of
    rng.randint(*datums) datums of rng.randint(*n) tokens, token ids from `ids(n)`, checked as
    they are and with some datums corrupted in place."""
    for _ in range(batches):
        length = rng.randint(*n)
        msg = pb.ForwardBackwardInput(loss_fn="cispo")
        for _ in range(rng.randint(*datums)):
            datum = msg.data.add()
            for tensor in (datum.model_input, datum.loss_fn_inputs.target_tokens):
                fm.write_tensor(tensor, "int64_data", ids(length))
            fm.write_tensor(datum.loss_fn_inputs.logprobs, "float_data", [-1.5] * length)
            fm.write_tensor(datum.loss_fn_inputs.advantages, "float_data", [rng.uniform(-1, 1) for _ in range(length)])
        body = msg.SerializeToString()
        check(body)
        check(corrupt_datums(rng, body, msg))


@pytest.mark.parametrize("seed", range(4))
def test_typed_datums_of_one_size_in_several_layouts_agree(seed):
    """Typed token ids of one- and two-byte varints (and, rarely, ids of 2**35 or more): datums
    of one byte size split their bytes between model_input and target_tokens in several ways,
    so the reader tries several templates per size; some datums corrupted in place."""
    rng = random.Random(3000 + seed)

    def ids(n: int) -> list[int]:
        out = [rng.choice((rng.randrange(128), rng.randrange(128, fm.VOCAB))) for _ in range(n)]
        if rng.random() < 0.01:
            out[0] = rng.choice((2**35, 2**35 - 1, fm.VOCAB))
        return out

    check_typed_batches(rng, 6, (200, 400), (1, 3), ids)


@pytest.mark.parametrize("long_span", [1, 1 << 30])
def test_tensors_copied_whole_or_element_by_element_agree(monkeypatch, long_span):
    """Both ways of copying tensors out of the buffer (one slice per tensor where tensors are
    long on average, else one index per element), on good and corrupted batches."""
    monkeypatch.setattr(datum_reader, "LONG_SPAN", long_span)
    rng = random.Random(4000 + long_span)
    for _ in range(30):
        check(fm.good_batch(rng, max_datums=8).SerializeToString())
        _, msg = uniform_batch(rng, 64)
        check(corrupt_datums(rng, msg.SerializeToString(), msg))


@pytest.mark.parametrize("seed", range(3))
def test_typed_datums_with_varints_of_one_length_agree(seed):
    """Typed tensors of several token ids that are all two-byte varints: a template with
    several varints per tensor is tried, and datums whose continuation bits differ (an id
    of one or three bytes, among others) are not read by it."""
    rng = random.Random(5000 + seed)

    def ids(n: int) -> list[int]:
        out = [rng.randrange(128, fm.VOCAB) for _ in range(n)]
        if rng.random() < 0.05:  # same byte size, other continuation bits
            i, j = rng.sample(range(n), 2)
            out[i], out[j] = rng.randrange(128), rng.randrange(1 << 14, 1 << 15)
        return out

    check_typed_batches(rng, 4, (150, 300), (2, 16), ids)
