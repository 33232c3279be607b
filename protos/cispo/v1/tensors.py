"""The wire's tensor codec, numpy only, shared by the client and the service.

A `Tensor` message is 1-D and holds its N elements in one of four forms: `dtype` + `raw_data`
(little-endian, packed: the fast path every cispo encoder writes) or one typed field
(`int64_data`, `float_data`, `double_data`; `dtype` then optional, and if set it must agree).
`shape`, when given, is [N]. Decoding is one `np.frombuffer` (raw) or one `np.asarray` (typed):
no Python per element. Encoding is one `tobytes()`.

The wire's vocabulary that both sides need lives here too: the dtypes, the loss inputs with the
kind of number each holds, and AdamParams' defaults. The torch side (cispo.service.convert) and
the client's types only wrap what this module returns; the vectorised reader of whole requests
is beside it (cispo.v1.datum_reader).
"""

from typing import Literal

import numpy as np

from cispo.v1 import training_pb2 as pb

# Wire dtype code -> its name (the numpy dtype's name), and back.
DTYPE_NAMES: dict[pb.DType, str] = {
    pb.DTYPE_INT64: "int64",
    pb.DTYPE_INT32: "int32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT64: "float64",
}
DTYPE_CODES: dict[str, pb.DType] = {name: code for code, name in DTYPE_NAMES.items()}
# Wire dtype code -> the little-endian numpy dtype of its raw_data.
RAW_DTYPES: dict[int, np.dtype] = {code: np.dtype(name).newbyteorder("<") for code, name in DTYPE_NAMES.items()}
# Data forms in field order: raw_data, then each typed field with (the dtype it implies, numpy dtype).
TYPED_FIELDS: dict[str, tuple[int, np.dtype]] = {
    "int64_data": (pb.DTYPE_INT64, np.dtype(np.int64)),
    "float_data": (pb.DTYPE_FLOAT32, np.dtype(np.float32)),
    "double_data": (pb.DTYPE_FLOAT64, np.dtype(np.float64)),
}
FORMS = ("raw_data", *TYPED_FIELDS)
# The typed field that holds each dtype (int32 travels widened, as int64_data).
_TYPED_FIELD_OF = {code: name for name, (code, _) in TYPED_FIELDS.items()}

NumberKind = Literal["int", "float"]
LOSS_INPUT_KINDS: dict[str, NumberKind] = {
    "target_tokens": "int",
    "logprobs": "float",
    "advantages": "float",
    "weights": "float",
    "sequence_ratio_mask": "float",
}
"""The loss inputs a Datum may carry (LossFnInputs' fields, in field order), and the kind of
number each holds: "int" token ids, "float" values."""
if list(LOSS_INPUT_KINDS) != [f.name for f in pb.LossFnInputs.DESCRIPTOR.fields]:
    raise ImportError("LOSS_INPUT_KINDS disagrees with training.proto's LossFnInputs")

ADAM_DEFAULTS: dict[str, float] = {
    "learning_rate": 1e-4,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,  # 0: no clipping
}
"""AdamParams' fields (in field order) and the value an unset one means (training.proto)."""
if list(ADAM_DEFAULTS) != [f.name for f in pb.AdamParams.DESCRIPTOR.fields]:
    raise ImportError("ADAM_DEFAULTS disagrees with training.proto's AdamParams")


class TensorError(ValueError):
    """A malformed Tensor message.

    str(error): what is wrong, in a sentence; `field` ("", ".dtype", ".raw_data" or ".shape")
    and `violation`: the part of the message at fault and why, as the server's field violation
    names them.
    """

    def __init__(self, message: str, field: str, violation: str) -> None:
        super().__init__(message)
        self.field = field
        self.violation = violation


def dtype_name(code: int) -> str:
    """The enum name, or the bare number for a value outside the enum (e.g. 99)."""
    return pb.DType.Name(code) if code in pb.DType.values() else f"{code} (not a DType)"


def decode_tensor(message: pb.Tensor) -> np.ndarray:
    """The elements of a Tensor message, shape (N,), in one numpy call: a read-only
    little-endian view of raw_data, or a new array of the typed field. An empty tensor with no
    dtype is int64. TensorError if malformed (several forms, raw_data without a wire dtype or
    of a length that is not a multiple of its size, a dtype that disagrees with the typed
    field, a shape other than [N])."""
    given = {f.name: value for f, value in message.ListFields()}  # the fields set, in one call
    present = [name for name in FORMS if name in given]
    if len(present) > 1:
        raise TensorError(
            f"more than one of {present} is set",
            "",
            f"set exactly one of raw_data, int64_data, float_data, double_data; got {', '.join(present)}",
        )
    code = given.get("dtype", pb.DTYPE_UNSPECIFIED)
    form = present[0] if present else ("raw_data" if code != pb.DTYPE_UNSPECIFIED else None)
    if form is None:
        array = np.zeros(0, dtype=np.int64)
    elif form == "raw_data":
        dtype = RAW_DTYPES.get(code)
        raw = given.get("raw_data", b"")
        if dtype is None:
            raise TensorError(
                f"raw_data needs a dtype, got {dtype_name(code)}",
                ".dtype",
                f"raw_data needs dtype INT64, INT32, FLOAT32 or FLOAT64, got {dtype_name(code)}",
            )
        if len(raw) % dtype.itemsize:
            raise TensorError(
                f"raw_data length {len(raw)} is not a multiple of {dtype.itemsize} ({dtype_name(code)})",
                ".raw_data",
                f"{len(raw)} bytes is not a multiple of the {dtype_name(code)} size {dtype.itemsize}",
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        declared, dtype = TYPED_FIELDS[form]
        if code not in (pb.DTYPE_UNSPECIFIED, declared):
            raise TensorError(
                f"dtype {dtype_name(code)} disagrees with {form}", ".dtype", f"{dtype_name(code)} disagrees with {form}"
            )
        array = np.asarray(given[form], dtype=dtype)
    shape = given.get("shape")
    if shape is not None and list(shape) != [array.shape[0]]:
        raise TensorError(
            f"shape {list(shape)} does not match {array.shape[0]} elements",
            ".shape",
            f"shape {list(shape)} does not match {array.shape[0]} elements (tensors are 1-D)",
        )
    return array


def writable_native(array: np.ndarray) -> np.ndarray:
    """`array` writable and in native byte order: one vectorised copy of a read-only view (what
    `decode_tensor` gives for raw_data), none of an array that already is."""
    return array.astype(array.dtype.newbyteorder("="), copy=not array.flags.writeable)


def wire_length(message: pb.Tensor) -> int:
    """Elements of a tensor as sent (the longest of its forms; decoding rejects several)."""
    raw = RAW_DTYPES.get(message.dtype)
    itemsize = raw.itemsize if raw is not None else 1
    return max(
        len(message.raw_data) // itemsize, len(message.int64_data), len(message.float_data), len(message.double_data)
    )


def encode_tensor(array_N: np.ndarray, out: pb.Tensor | None = None, typed: bool = False) -> pb.Tensor:
    """A Tensor message of a 1-D array of a wire dtype (int64, int32, float32, float64; any byte
    order): dtype, shape [N] and the little-endian raw_data, or with `typed` the typed field
    (which JSON clients show as numbers; int32 travels as int64_data). Fills `out` in place
    when given. KeyError for another dtype."""
    code = DTYPE_CODES[array_N.dtype.name]
    out = pb.Tensor() if out is None else out
    if typed and code == pb.DTYPE_INT32:
        code, array_N = pb.DTYPE_INT64, array_N.astype(np.int64)
    out.dtype = code
    out.shape[:] = [array_N.shape[0]]
    if typed:
        getattr(out, _TYPED_FIELD_OF[code]).extend(array_N)
    else:
        out.raw_data = array_N.astype(RAW_DTYPES[code], copy=False).tobytes()
    return out
