"""Seeded generators of good and bad `cispo.v1` messages for tests/test_fuzz.py.

Everything here is a pure function of a `random.Random`, so a seed replays the same traffic.

Good messages: small valid batches for each loss (every tensor form: raw bytes of each dtype and
the typed fields), valid AdamParams, state names.

Bad messages, by class (`BadMessage.cls`; `kind` refines it):
    random_bytes      random bodies, on every RPC
    truncated         a good message's serialisation cut short
    bitflip           a good message's serialisation with 1-3 bits flipped
    wrong_wire_type   fields re-encoded with the wrong wire type, invalid wire types, deep groups,
                      length prefixes that run past the end
    mutated_fields    well-formed messages with a bad field (ids out of vocab, NaN, 1e300, dtype 99,
                      several tensor forms, odd raw length, shape mismatch, unused loss inputs, ...)
    adam_extremes     AdamParams out of range or not representable in float32; updates that would
                      not be finite
    bad_names         state names: 5000 characters, '../', '.hidden', '/', NUL, spaces, 129 chars
    load_missing      LoadState of a valid name that was never saved
    wrong_message     a good message of another RPC's type (e.g. a ForwardBackwardInput to OptimStep)
    oversize          a body over --max-message-bytes (RESOURCE_EXHAUSTED naming the limit)
A corrupted body that still parses locally (same protobuf library as the server) is "routed":
sent where it cannot change state (a ForwardBackwardInput goes to Forward), or kept only when it
is certainly invalid, or skipped, so that the twin comparison stays exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from cispo.v1 import training_pb2 as pb

VOCAB = 1024
SERVICE = "/cispo.v1.TrainingService/"
REQUEST_TYPES = {
    "GetInfo": pb.GetInfoRequest,
    "Forward": pb.ForwardBackwardInput,
    "ForwardBackward": pb.ForwardBackwardInput,
    "OptimStep": pb.OptimStepRequest,
    "SaveState": pb.SaveStateRequest,
    "LoadState": pb.LoadStateRequest,
    "Stream": pb.StreamRequest,
}
RESPONSE_TYPES = {
    "GetInfo": pb.GetInfoResponse,
    "Forward": pb.ForwardBackwardOutput,
    "ForwardBackward": pb.ForwardBackwardOutput,
    "OptimStep": pb.OptimStepResponse,
    "SaveState": pb.SaveStateResponse,
    "LoadState": pb.LoadStateResponse,
    "Stream": pb.StreamResponse,
}
UNARY = tuple(m for m in REQUEST_TYPES if m != "Stream")
# Stream op field <-> unary method.
OP_METHOD = {
    "forward": "Forward",
    "forward_backward": "ForwardBackward",
    "optim_step": "OptimStep",
    "save_state": "SaveState",
    "load_state": "LoadState",
    "get_info": "GetInfo",
}
METHOD_OP = {m: op for op, m in OP_METHOD.items()}

OK, IA, RE, FP, NF = "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "NOT_FOUND"
NEVER = ("UNKNOWN", "INTERNAL")

LOSSES = ("cispo", "ppo", "importance_sampling", "cross_entropy", "dro", "gspo")
REQUIRED = {
    "cispo": ("logprobs", "advantages"),
    "ppo": ("logprobs", "advantages"),
    "importance_sampling": ("logprobs", "advantages"),
    "cross_entropy": ("weights",),
    "dro": ("logprobs", "advantages"),
    "gspo": ("logprobs", "advantages"),
}
UNUSED = {
    "cispo": ("weights", "sequence_ratio_mask"),
    "ppo": ("weights", "sequence_ratio_mask"),
    "importance_sampling": ("weights", "sequence_ratio_mask"),
    "dro": ("weights", "sequence_ratio_mask"),
    "gspo": ("weights",),
    "cross_entropy": ("logprobs", "advantages", "sequence_ratio_mask"),
}
RATIO_BOUNDED = ("cispo", "ppo", "gspo")  # losses with clip thresholds
FLOAT32_MAX = float(np.finfo(np.float32).max)
LONG = 5000  # characters of the "huge" names


def key(rng: random.Random) -> str:
    """A fresh idempotency key (UUID-like, 32 hex digits)."""
    return f"{rng.getrandbits(128):032x}"


# --- tensors ------------------------------------------------------------------------------------

INT_FORMS = ("raw_i64", "raw_i32", "int64_data", "int64_data+dtype")
FLOAT_FORMS = ("raw_f32", "raw_f64", "float_data", "double_data", "float_data+dtype")


def write_tensor(t: pb.Tensor, form: str, values, shape: bool = False) -> pb.Tensor:
    """Overwrite `t` with `values` in one wire form."""
    t.Clear()
    if form == "raw_i64":
        t.dtype, t.raw_data = pb.DTYPE_INT64, np.asarray(values, dtype="<i8").tobytes()
    elif form == "raw_i32":
        t.dtype, t.raw_data = pb.DTYPE_INT32, np.asarray(values, dtype="<i4").tobytes()
    elif form == "raw_f32":
        t.dtype, t.raw_data = pb.DTYPE_FLOAT32, np.asarray(values, dtype="<f4").tobytes()
    elif form == "raw_f64":
        t.dtype, t.raw_data = pb.DTYPE_FLOAT64, np.asarray(values, dtype="<f8").tobytes()
    elif form == "int64_data":
        t.int64_data.extend(int(v) for v in values)
    elif form == "int64_data+dtype":
        t.dtype = pb.DTYPE_INT64
        t.int64_data.extend(int(v) for v in values)
    elif form == "float_data":
        t.float_data.extend(float(v) for v in values)
    elif form == "float_data+dtype":
        t.dtype = pb.DTYPE_FLOAT32
        t.float_data.extend(float(v) for v in values)
    elif form == "double_data":
        t.double_data.extend(float(v) for v in values)
    else:
        raise ValueError(form)
    if shape:
        t.shape.append(len(values))
    return t


@dataclass
class BatchSpec:
    """A forward_backward batch as plain values: datums map tensor name -> list of numbers."""

    datums: list[dict[str, list]]
    loss_fn: str
    config: dict[str, float] = field(default_factory=dict)


def good_spec(
    rng: random.Random, loss_fn: str | None = None, max_datums: int = 4, max_len: int = 40, min_len: int = 1
) -> BatchSpec:
    loss_fn = loss_fn or rng.choice(
        ("cispo", "cispo", "cispo", "ppo", "importance_sampling", "cross_entropy", "dro", "gspo")
    )
    datums = []
    for _ in range(rng.randint(1, max_datums)):
        n = rng.randint(min_len, max_len)
        d = {
            "model_input": [rng.randrange(VOCAB) for _ in range(n)],
            "target_tokens": [rng.randrange(VOCAB) for _ in range(n)],
        }
        if "logprobs" in REQUIRED[loss_fn]:
            # The embedded model's logprobs are about -log(1024) = -6.9: ratios stay moderate.
            d["logprobs"] = [float(np.float32(-rng.uniform(6.0, 8.0))) for _ in range(n)]
            d["advantages"] = [0.0 if rng.random() < 0.3 else float(np.float32(rng.uniform(-1, 1))) for _ in range(n)]
            if loss_fn == "gspo" and rng.random() < 0.5:
                d["sequence_ratio_mask"] = [float(rng.random() < 0.6) for _ in range(n)]
        else:
            d["weights"] = [0.0 if rng.random() < 0.3 else float(np.float32(rng.uniform(0, 1))) for _ in range(n)]
        datums.append(d)
    config = {}
    if loss_fn == "cispo" and rng.random() < 0.4:
        config = {"clip_low_threshold": rng.choice((0.0, 0.5)), "clip_high_threshold": rng.choice((2.0, 4.0, 5.0))}
    elif loss_fn in ("ppo", "gspo") and rng.random() < 0.4:
        config = {"clip_low_threshold": 0.8, "clip_high_threshold": rng.choice((1.2, 1.3))}
    elif loss_fn == "dro" and rng.random() < 0.4:
        config = {"beta": rng.choice((0.0, 0.05, 1.0))}
    return BatchSpec(datums, loss_fn, config)


def build(rng: random.Random, spec: BatchSpec, idempotency_key: str = "") -> pb.ForwardBackwardInput:
    """The wire form of `spec`, each tensor in a randomly chosen (valid) form."""
    msg = pb.ForwardBackwardInput(
        loss_fn=rng.choice((spec.loss_fn, spec.loss_fn, "")) if spec.loss_fn == "cispo" else spec.loss_fn,
        idempotency_key=idempotency_key,
    )
    msg.loss_fn_config.update(spec.config)
    for d in spec.datums:
        datum = msg.data.add()
        for name, values in d.items():
            t = datum.model_input if name == "model_input" else getattr(datum.loss_fn_inputs, name)
            forms = INT_FORMS if name in ("model_input", "target_tokens") else FLOAT_FORMS
            write_tensor(t, rng.choice(forms), values, shape=rng.random() < 0.3)
    return msg


def good_batch(
    rng: random.Random, loss_fn: str | None = None, idempotency_key: str = "", **kw
) -> pb.ForwardBackwardInput:
    return build(rng, good_spec(rng, loss_fn, **kw), idempotency_key)


def good_adam(rng: random.Random) -> pb.AdamParams:
    p = pb.AdamParams(learning_rate=rng.choice((1e-3, 3e-4, 1e-4)))
    if rng.random() < 0.3:
        p.grad_clip_norm = rng.choice((0.5, 1.0, 10.0))
    if rng.random() < 0.3:
        p.weight_decay = 0.01
    if rng.random() < 0.2:
        p.beta2 = 0.999
    return p


# --- bad messages -------------------------------------------------------------------------------


@dataclass
class BadMessage:
    cls: str
    kind: str
    method: str  # a unary method, or "Stream" (body is then one StreamRequest item)
    body: bytes
    expected: frozenset
    checks: dict = field(default_factory=dict)
    # checks: "type_name": str that must be in the error message (undecodable bodies);
    #         "no_echo": str that must not be echoed (and the message must stay short);
    #         "limit": str naming the limit in a RESOURCE_EXHAUSTED message;
    #         "limit_any": strings, one of which must name the limit in a RESOURCE_EXHAUSTED message;
    #         "read_only": the message may be accepted, so it is only sent where it changes nothing.


@dataclass
class Context:
    """What the generators need to know about the state of the fuzzed server."""

    has_grad: bool = False  # a gradient is accumulated (the twin's gradient is not zero)
    saved: set = field(default_factory=set)  # state names that exist
    max_message_bytes: int = 1 << 20  # the server's --max-message-bytes


def _fb_mutations():
    """(kind, function(rng, spec, msg) -> (expected, checks)) mutating `msg` in place."""

    def pick(rng, msg, names):
        i = rng.randrange(len(msg.data))
        name = rng.choice(names)
        d = msg.data[i]
        t = d.model_input if name == "model_input" else getattr(d.loss_fn_inputs, name)
        return i, name, t

    def float_names(spec):
        return REQUIRED[spec.loss_fn]

    def length_mismatch(rng, spec, msg):
        i, name, t = pick(rng, msg, ("target_tokens", *float_names(spec)))
        values = list(spec.datums[i][name])
        values = values[:-1] if values and rng.random() < 0.5 else [*values, values[0] if values else 0]
        if len(values) == len(spec.datums[i]["model_input"]):
            values.append(0)
        forms = INT_FORMS if name == "target_tokens" else FLOAT_FORMS
        write_tensor(t, rng.choice(forms), values)
        return {IA}, {}

    def token_out_of_vocab(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens"))
        values = list(spec.datums[i][name])
        values[rng.randrange(len(values))] = rng.choice((VOCAB, VOCAB + 1, 2**31 - 1, 2**40, 2**63 - 1))
        write_tensor(t, rng.choice(("raw_i64", "int64_data")), values)
        return {IA}, {}

    def negative_token(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens"))
        values = list(spec.datums[i][name])
        values[rng.randrange(len(values))] = rng.choice((-1, -2, -(2**31), -(2**63)))
        forms = ("raw_i64", "int64_data", "raw_i32") if min(values) >= -(2**31) else ("raw_i64", "int64_data")
        form = rng.choice(forms)
        write_tensor(t, form, values)
        return {IA}, {}

    def nonfinite_float(rng, spec, msg):
        i, name, t = pick(rng, msg, float_names(spec))
        values = list(spec.datums[i][name])
        values[rng.randrange(len(values))] = rng.choice((math.nan, math.inf, -math.inf))
        write_tensor(t, rng.choice(FLOAT_FORMS), values)
        return {IA}, {}

    def huge_double(rng, spec, msg):
        # finite as float64, not representable in float32
        i, name, t = pick(rng, msg, float_names(spec))
        values = list(spec.datums[i][name])
        big = (
            rng.choice((1e300, -1e300, 1e39, -1e39, 3.5e38, -3.5e38))
            if name != "logprobs"
            else rng.choice((-1e300, -1e39, -3.5e38))
        )
        values[rng.randrange(len(values))] = big
        write_tensor(t, rng.choice(("double_data", "raw_f64")), values)
        return {IA}, {}

    def positive_logprob(rng, spec, msg):
        if "logprobs" not in spec.datums[0]:
            return unused_input(rng, spec, msg)
        i, name, t = pick(rng, msg, ("logprobs",))
        values = list(spec.datums[i][name])
        values[rng.randrange(len(values))] = rng.choice((0.5, 1e-3, 100.0))
        write_tensor(t, rng.choice(FLOAT_FORMS), values)
        return {IA}, {}

    def dtype_99(rng, spec, msg):
        _, _, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        t.dtype = rng.choice((5, 99, 2**31 - 1, -1))
        return {IA}, {}

    def dtype_disagrees(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        values = spec.datums[i][name]
        if name in ("model_input", "target_tokens"):
            write_tensor(t, "int64_data", values)
            t.dtype = rng.choice((pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_INT32))
        else:
            write_tensor(t, rng.choice(("float_data", "double_data")), values)
            t.dtype = rng.choice((pb.DTYPE_INT64, pb.DTYPE_INT32))
        return {IA}, {}

    def wrong_kind(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        values = spec.datums[i][name]
        if name in ("model_input", "target_tokens"):
            write_tensor(t, rng.choice(("float_data", "raw_f32", "double_data")), [float(v) for v in values])
        else:
            write_tensor(t, rng.choice(("int64_data", "raw_i64")), [-1] * len(values))
        return {IA}, {}

    def several_forms(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        values = spec.datums[i][name]
        ints = name in ("model_input", "target_tokens")
        write_tensor(t, "raw_i64" if ints else "raw_f32", values)
        extra = rng.choice(("int64_data", "float_data", "double_data"))
        getattr(t, extra).extend(int(v) if extra == "int64_data" else float(v) for v in values)
        if rng.random() < 0.5:
            t.ClearField("raw_data")
            t.dtype = pb.DTYPE_UNSPECIFIED
            other = rng.choice([f for f in ("int64_data", "float_data", "double_data") if f != extra])
            getattr(t, other).extend(int(v) if other == "int64_data" else float(v) for v in values)
        return {IA}, {}

    def odd_raw_length(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        ints = name in ("model_input", "target_tokens")
        write_tensor(t, rng.choice(("raw_i64", "raw_i32") if ints else ("raw_f32", "raw_f64")), spec.datums[i][name])
        t.raw_data = t.raw_data + bytes(rng.randint(1, 3))
        return {IA}, {}

    def raw_without_dtype(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        ints = name in ("model_input", "target_tokens")
        write_tensor(t, "raw_i64" if ints else "raw_f32", spec.datums[i][name])
        t.dtype = pb.DTYPE_UNSPECIFIED
        return {IA}, {}

    def shape_mismatch(rng, spec, msg):
        i, name, t = pick(rng, msg, ("model_input", "target_tokens", *float_names(spec)))
        n = len(spec.datums[i][name])
        del t.shape[:]
        t.shape.extend(rng.choice(([n + 1], [n, 1], [1, n], [-n], [0], [n, n], [2**62])))
        return {IA}, {}

    def empty_data(rng, spec, msg):
        del msg.data[:]
        return {IA}, {}

    def empty_model_input(rng, spec, msg):
        i = rng.randrange(len(msg.data))
        d = msg.data[i]
        d.model_input.Clear()
        if rng.random() < 0.5:
            d.ClearField("model_input")
        for name in ("target_tokens", *REQUIRED[spec.loss_fn]):
            getattr(d.loss_fn_inputs, name).Clear()
        return {IA}, {}

    def missing_model_input(rng, spec, msg):
        msg.data[rng.randrange(len(msg.data))].ClearField("model_input")
        return {IA}, {}

    def missing_input(rng, spec, msg):
        d = msg.data[rng.randrange(len(msg.data))]
        d.loss_fn_inputs.ClearField(rng.choice(("target_tokens", *REQUIRED[spec.loss_fn])))
        return {IA}, {}

    def unused_input(rng, spec, msg):
        i = rng.randrange(len(msg.data))
        n = len(spec.datums[i]["model_input"])
        name = rng.choice(UNUSED[spec.loss_fn])
        values = [0.0] * n if name != "advantages" else [0.5] * n
        if name == "logprobs":
            values = [-1.0] * n
        write_tensor(getattr(msg.data[i].loss_fn_inputs, name), rng.choice(FLOAT_FORMS), values)
        return {IA}, {}

    def unknown_loss(rng, spec, msg):
        msg.loss_fn = rng.choice(("nope", "CISPO", "cispo ", "grpo", "cross-entropy", "\u00e9", "a" * 129))
        return {IA}, {}

    def huge_loss_name(rng, spec, msg):
        msg.loss_fn = rng.choice("xyz") * LONG
        return {IA}, {"no_echo": msg.loss_fn}

    def unknown_config_key(rng, spec, msg):
        msg.loss_fn_config[rng.choice(("clip_hi", "epsilon", "", "weights", "CLIP_LOW_THRESHOLD"))] = 0.5
        return {IA}, {}

    def huge_config_key(rng, spec, msg):
        k = rng.choice("kq") * LONG
        msg.loss_fn_config[k] = 1.0
        return {IA}, {"no_echo": k}

    def config_value(rng, spec, msg):
        if spec.loss_fn == "dro":
            msg.loss_fn_config["beta"] = rng.choice((-0.1, -math.inf, math.nan, math.inf, 1e39))
            return {IA}, {}
        if spec.loss_fn not in RATIO_BOUNDED:
            msg.loss_fn_config["clip_high_threshold"] = 2.0  # no such key for this loss
            return {IA}, {}
        lo, hi = rng.choice(
            (
                (3.0, 2.0),
                (0.0, 0.5),
                (-1.0, 4.0),
                (math.nan, 4.0),
                (0.0, math.inf),
                (0.0, math.nan),
                (-math.inf, 4.0),
                (2.0, 1.5),
                (0.0, -4.0),
            )
        )
        msg.loss_fn_config["clip_low_threshold"] = lo
        msg.loss_fn_config["clip_high_threshold"] = hi
        return {IA}, {}

    def config_beyond_float32(rng, spec, msg):
        # finite doubles that float32 cannot hold: INVALID_ARGUMENT, or (read-only, so that an
        # accepted one changes nothing) taken as "no bound"; never INTERNAL
        if spec.loss_fn not in RATIO_BOUNDED:
            msg.loss_fn = rng.choice(RATIO_BOUNDED)
            for d, sd in zip(msg.data, spec.datums):
                if "logprobs" not in sd:
                    n = len(sd["model_input"])
                    d.loss_fn_inputs.ClearField("weights")
                    write_tensor(d.loss_fn_inputs.logprobs, "float_data", [-7.0] * n)
                    write_tensor(d.loss_fn_inputs.advantages, "float_data", [0.5] * n)
            msg.loss_fn_config.clear()
        msg.loss_fn_config["clip_high_threshold"] = rng.choice((1e39, 3.5e38, 1e300, 1.7e308))
        if rng.random() < 0.3:
            msg.loss_fn_config["clip_low_threshold"] = rng.choice((0.0, 1.0, 2.0))
        return {IA, OK}, {"read_only": True}

    def too_many_tokens(rng, spec, msg):
        # over --max-tokens-per-request 4096, well under --max-message-bytes
        n = rng.choice((4097, 5000))
        parts = rng.choice((1, 2, 7))
        sizes = [n // parts] * (parts - 1) + [n - (n // parts) * (parts - 1)]
        big = BatchSpec([], spec.loss_fn, {})
        for s in sizes:
            d = {"model_input": [1] * s, "target_tokens": [2] * s}
            for name in REQUIRED[spec.loss_fn]:
                d[name] = [-1.0] * s if name == "logprobs" else [0.5] * s
            big.datums.append(d)
        msg.CopyFrom(build(rng, big))
        return {RE}, {"limit": "max_tokens_per_request"}

    def long_key(rng, spec, msg):
        msg.idempotency_key = rng.choice(("k" * 129, "k" * LONG))
        return {IA}, {"no_echo": msg.idempotency_key} if len(msg.idempotency_key) == LONG else {}

    return {
        f.__name__: f
        for f in (
            length_mismatch,
            token_out_of_vocab,
            negative_token,
            nonfinite_float,
            huge_double,
            positive_logprob,
            dtype_99,
            dtype_disagrees,
            wrong_kind,
            several_forms,
            odd_raw_length,
            raw_without_dtype,
            shape_mismatch,
            empty_data,
            empty_model_input,
            missing_model_input,
            missing_input,
            unused_input,
            unknown_loss,
            huge_loss_name,
            unknown_config_key,
            huge_config_key,
            config_value,
            config_beyond_float32,
            too_many_tokens,
            long_key,
        )
    }


FB_MUTATIONS = _fb_mutations()

# AdamParams that are always INVALID_ARGUMENT: out of range, not finite, or not representable in float32.
ADAM_INVALID = (
    ("eps_1e-50", dict(eps=1e-50)),
    ("eps_0", dict(eps=0.0)),
    ("eps_negative", dict(eps=-1e-8)),
    ("eps_nan", dict(eps=math.nan)),
    ("lr_1e39", dict(learning_rate=1e39)),
    ("lr_negative", dict(learning_rate=-1e-4)),
    ("lr_nan", dict(learning_rate=math.nan)),
    ("lr_inf", dict(learning_rate=math.inf)),
    ("beta1_1", dict(beta1=1.0)),
    ("beta1_negative", dict(beta1=-0.1)),
    ("beta1_nan", dict(beta1=math.nan)),
    ("beta2_1", dict(beta2=1.0)),
    ("beta2_1.5", dict(beta2=1.5)),
    ("wd_negative", dict(weight_decay=-0.01)),
    ("wd_1e39", dict(weight_decay=1e39)),
    ("wd_inf", dict(weight_decay=math.inf)),
    ("clip_negative", dict(grad_clip_norm=-1.0)),
    ("clip_nan", dict(grad_clip_norm=math.nan)),
    ("clip_1e300", dict(grad_clip_norm=1e300)),
    ("lr_-inf", dict(learning_rate=-math.inf)),
)
# Valid-looking AdamParams whose update is not finite when a gradient is accumulated:
# FAILED_PRECONDITION (the step is refused); INVALID_ARGUMENT is accepted too (lr*wd > float32).
ADAM_NONFINITE_UPDATE = (
    ("update_wd_overflow", dict(learning_rate=1e38, weight_decay=1e38)),
    ("update_lr_wd_overflow", dict(learning_rate=3e38, weight_decay=3e38)),
)

BAD_NAMES = (
    ("name_5000", "n" * LONG),
    ("name_dotdot", "../outside"),
    ("name_dotdot_deep", "../../etc/passwd"),
    ("name_hidden", ".hidden"),
    ("name_slash", "a/b"),
    ("name_empty", ""),
    ("name_nul", "a\x00b"),
    ("name_space", "a b"),
    ("name_129", "a" * 129),
    ("name_unicode", "\u00e9t\u00e9"),
    ("name_dot", "."),
    ("name_dotdot_only", ".."),
    ("name_absolute", "/tmp/x"),
    ("name_backslash", "..\\x"),
    ("name_newline", "a\nb"),
)


def adam_certainly_invalid(p: pb.AdamParams) -> bool:
    """True if the spec makes these AdamParams INVALID_ARGUMENT whatever the server state."""
    for f, v in p.ListFields():
        if not math.isfinite(v) or v < 0 or abs(v) > FLOAT32_MAX:
            return True
        if f.name in ("beta1", "beta2") and v >= 1:
            return True
        if f.name == "eps" and float(np.float32(v)) == 0.0:
            return True
    return False


def name_certainly_invalid(name: str) -> bool:
    import re

    return not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", name)


def route(method: str, body: bytes, ctx: Context):
    """Where a (possibly corrupted) body may be sent without touching the twin comparison, and
    the codes it may get: (method, expected, checks, body), or None (skip it)."""
    routed = _route(method, body, ctx)
    if routed is None:
        return None
    target, expected, checks, sent = routed if len(routed) == 4 else (*routed, body)
    if _expects_a_version(target, sent):  # one the fuzzer cannot know: refused when its turn comes
        expected = frozenset(expected) | {"ABORTED", FP}
    return target, expected, checks, sent


def _expects_a_version(method: str, body: bytes) -> bool:
    try:
        msg = REQUEST_TYPES[method].FromString(body)
    except DecodeError:
        return False
    if method == "Stream":
        op = msg.WhichOneof("op")
        msg = getattr(msg, op) if op else msg
    return "expected_version" in msg.DESCRIPTOR.fields_by_name and msg.HasField("expected_version")


def _route(method: str, body: bytes, ctx: Context):
    T = REQUEST_TYPES[method]
    try:
        msg = T.FromString(body)
    except DecodeError:
        return method, frozenset({IA}), {"type_name": T.DESCRIPTOR.name}
    if method == "Stream":
        op = msg.WhichOneof("op")
        if op is None:
            return method, frozenset({IA}), {}
        inner = route(OP_METHOD[op], getattr(msg, op).SerializeToString(), ctx)
        if inner is None:
            return None
        target, expected, checks, _ = inner
        if target != OP_METHOD[op]:  # a forward_backward rerouted to forward
            out = pb.StreamRequest(request_id=msg.request_id)
            getattr(out, METHOD_OP[target]).CopyFrom(getattr(msg, op))
            return ("Stream", frozenset(expected), checks, out.SerializeToString())
        return "Stream", frozenset(expected), checks
    if len(getattr(msg, "idempotency_key", "")) > 128:
        return method, frozenset({IA}), {}
    model_id = getattr(msg, "model_id", "")
    if model_id and name_certainly_invalid(model_id):
        return method, frozenset({IA}), {}
    if model_id not in ("", "default"):  # the fuzzer's server has the default run only
        return method, frozenset({NF, IA, RE} if method in ("Forward", "ForwardBackward") else {NF, IA}), {}
    if method == "GetInfo":
        return method, frozenset({OK}), {}
    if method in ("Forward", "ForwardBackward"):
        if not msg.data:
            return method, frozenset({IA}), {}
        return "Forward", frozenset({OK, IA, RE}), {}
    if method == "OptimStep":
        return (method, frozenset({IA}), {}) if adam_certainly_invalid(msg.adam_params) else None
    if method in ("SaveState", "LoadState"):
        if name_certainly_invalid(msg.name):
            return method, frozenset({IA}), {}
        if method == "LoadState" and msg.name not in ctx.saved:
            return method, frozenset({FP}), {}
        return None
    raise AssertionError(method)


def good_body(rng: random.Random, method: str, ctx: Context) -> bytes:
    """A valid serialisation for `method`, the base of truncation and bit flips."""
    if method in ("Forward", "ForwardBackward"):
        return good_batch(rng, idempotency_key=key(rng) if rng.random() < 0.5 else "").SerializeToString()
    if method == "OptimStep":
        return pb.OptimStepRequest(adam_params=good_adam(rng), idempotency_key=key(rng)).SerializeToString()
    if method == "SaveState":
        return pb.SaveStateRequest(name=f"fz-{rng.randrange(10**6)}", idempotency_key=key(rng)).SerializeToString()
    if method == "LoadState":
        return pb.LoadStateRequest(
            name=f"fz-{rng.randrange(10**6)}", with_optimizer=rng.random() < 0.5, idempotency_key=key(rng)
        ).SerializeToString()
    if method == "GetInfo":
        return b""
    op = rng.choice(("forward", "forward_backward", "optim_step", "save_state", "load_state", "get_info"))
    inner = REQUEST_TYPES[OP_METHOD[op]].FromString(good_body(rng, OP_METHOD[op], ctx))
    req = pb.StreamRequest(request_id=f"r{rng.randrange(10**6)}")
    getattr(req, op).CopyFrom(inner)
    return req.SerializeToString()


def _random_bytes(rng):
    n = rng.choice((1, 2, 3, 5, 8, 16, 64, 200, rng.randint(1, 1000)))
    return bytes(rng.getrandbits(8) for _ in range(n))


def _truncate(rng, body):
    return body[: rng.randrange(1, len(body))] if len(body) > 1 else b"\xff"


def _bitflip(rng, body):
    if not body:
        return b"\x80"
    b = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _wrong_wire_type(rng, body):
    kind = rng.randrange(6)
    field_no = rng.randint(1, 7)
    if kind == 0:  # a known field with another (valid) wire type
        wt = rng.choice((0, 1, 5))
        payload = {0: _varint(rng.getrandbits(20)), 1: bytes(8), 5: bytes(4)}[wt]
        extra = _varint(field_no << 3 | wt) + payload
    elif kind == 1:  # invalid wire types 6 and 7
        extra = _varint(field_no << 3 | rng.choice((6, 7))) + bytes(rng.randint(0, 4))
    elif kind == 2:  # unmatched end-group / start-group
        extra = _varint(field_no << 3 | rng.choice((3, 4)))
    elif kind == 3:  # groups nested past any recursion limit (field 15: unknown everywhere)
        depth = rng.choice((101, 200, 2000))
        extra = b"\x7b" * depth + b"\x7c" * depth
    elif kind == 4:  # a length prefix that runs past the end
        extra = _varint(field_no << 3 | 2) + _varint(rng.choice((2**31 - 1, 2**32 + 5, 1000)))
    else:  # field number 0 (invalid)
        extra = _varint(0 << 3 | rng.choice((0, 2))) + b"\x01"
    return body + extra if rng.random() < 0.5 else extra + body


def corrupt(rng: random.Random, cls: str, method: str, ctx: Context) -> bytes:
    if cls == "random_bytes":
        return _random_bytes(rng)
    body = good_body(rng, method, ctx)
    if cls == "truncated":
        return _truncate(rng, body)
    if cls == "bitflip":
        return _bitflip(rng, body)
    if cls == "wrong_wire_type":
        return _wrong_wire_type(rng, body)
    raise ValueError(cls)


BYTE_CLASSES = ("random_bytes", "truncated", "bitflip", "wrong_wire_type")


def bad_unary(rng: random.Random, ctx: Context):
    """One bad unary message, or None when the routing skipped it (then `skipped` tells the class)."""
    cls = rng.choices(
        (
            "random_bytes",
            "truncated",
            "bitflip",
            "wrong_wire_type",
            "mutated_fields",
            "adam_extremes",
            "bad_names",
            "load_missing",
            "wrong_message",
            "oversize",
        ),
        weights=(18, 13, 18, 8, 30, 7, 5, 1, 4, 1),
    )[0]
    if cls in BYTE_CLASSES:
        method = rng.choice(UNARY)
        body = corrupt(rng, cls, method, ctx)
        routed = route(method, body, ctx)
        if routed is None:
            return cls, None
        target, expected, checks, body = routed
        return cls, BadMessage(cls, method, target, body, frozenset(expected), checks)
    if cls == "wrong_message":
        method = rng.choice(UNARY)
        source = rng.choice([m for m in UNARY if REQUEST_TYPES[m] is not REQUEST_TYPES[method] and m != "GetInfo"])
        routed = route(method, good_body(rng, source, ctx), ctx)
        if routed is None:
            return cls, None
        target, expected, checks, body = routed
        return cls, BadMessage(cls, f"{source}->{method}", target, body, frozenset(expected), checks)
    if cls == "oversize":
        method = rng.choice(UNARY)
        body = bytes([0x7A]) + _varint(ctx.max_message_bytes + 1) + bytes(ctx.max_message_bytes + 1)  # field 15
        return cls, BadMessage(
            cls, method, method, body, frozenset({RE}), {"limit_any": ("max_message_bytes", str(ctx.max_message_bytes))}
        )
    if cls == "mutated_fields":
        kind, _, msg, expected, checks = mutated_batch(rng)
        method = "Forward" if checks.get("read_only") else rng.choice(("ForwardBackward", "ForwardBackward", "Forward"))
        return cls, BadMessage(cls, kind, method, msg.SerializeToString(), frozenset(expected), checks)
    if cls == "adam_extremes":
        table = ADAM_INVALID + (ADAM_NONFINITE_UPDATE if ctx.has_grad else ())
        kind, fields = rng.choice(table)
        req = pb.OptimStepRequest(
            adam_params=pb.AdamParams(**fields), idempotency_key=key(rng) if rng.random() < 0.5 else ""
        )
        expected = {IA} if (kind, fields) in ADAM_INVALID else {FP, IA}
        return cls, BadMessage(cls, kind, "OptimStep", req.SerializeToString(), frozenset(expected))
    if cls == "bad_names":
        kind, name = rng.choice(BAD_NAMES)
        method = rng.choice(("SaveState", "LoadState"))
        req = (
            pb.SaveStateRequest(name=name)
            if method == "SaveState"
            else pb.LoadStateRequest(name=name, with_optimizer=rng.random() < 0.5)
        )
        checks = {"no_echo": name} if len(name) == LONG else {}
        return cls, BadMessage(cls, kind, method, req.SerializeToString(), frozenset({IA}), checks)
    if cls == "load_missing":
        req = pb.LoadStateRequest(name=f"never-saved-{rng.randrange(10**6)}", with_optimizer=rng.random() < 0.5)
        return cls, BadMessage(cls, "missing", "LoadState", req.SerializeToString(), frozenset({FP}))
    raise AssertionError(cls)


def mutated_batch(rng: random.Random, kind: str | None = None):
    """(kind, spec, message, expected codes, checks): a valid batch with one bad field."""
    spec = good_spec(rng)
    msg = build(rng, spec, key(rng) if rng.random() < 0.3 else "")
    kind = kind or rng.choice(list(FB_MUTATIONS))
    expected, checks = FB_MUTATIONS[kind](rng, spec, msg)
    return kind, spec, msg, expected, checks


def stream_item(op: str, request_id: str, inner) -> pb.StreamRequest:
    req = pb.StreamRequest(request_id=request_id)
    getattr(req, op).CopyFrom(inner)
    return req
