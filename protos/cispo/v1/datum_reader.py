"""The vectorised reader of ForwardBackwardInput datums, numpy only: whole-array operations over
the datums' encodings, no message per datum and no Python per element.

A request is parsed in LAZY's form, whose `data` are the datums' encodings as bytes, and
`read_data` reads the datums' fields and tensors from those bytes in parallel. A datum that is
not in the plain form protobuf serialisers write (a repeated or unknown field, a malformed
tensor, an int64_data id of 2**35 or more) is left to the exact decoder (cispo.v1.tensors), and
only such datums. Its speed is what bench/bench_validation.py and bench/bench_pipeline.py
measure; tests/test_wire_decode.py holds it to the exact decoder, datum by datum.
"""

from typing import NamedTuple

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from cispo.v1 import training_pb2 as pb
from cispo.v1.tensors import FORMS, RAW_DTYPES, TYPED_FIELDS


def _lazy_types() -> dict[type[Message], type[Message]]:
    """ForwardBackwardInput and StreamRequest as protobuf types of a copy of the .proto in which
    ForwardBackwardInput.data is `repeated bytes` (wire-compatible: a message field's encoding
    is length-prefixed bytes), so parsing keeps each datum as its bytes."""
    pool, added = descriptor_pool.DescriptorPool(), set()

    def add(file, change=lambda proto: None) -> None:
        if file.name in added:
            return
        added.add(file.name)
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        change(proto)
        pool.Add(proto)

    def data_as_bytes(proto) -> None:
        message = next(m for m in proto.message_type if m.name == pb.ForwardBackwardInput.DESCRIPTOR.name)
        data = next(f for f in message.field if f.name == "data")
        data.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
        data.ClearField("type_name")

    add(pb.DESCRIPTOR, data_as_bytes)
    return {
        t: GetMessageClass(pool.FindMessageTypeByName(t.DESCRIPTOR.full_name))
        for t in (pb.ForwardBackwardInput, pb.StreamRequest)
    }


LAZY = _lazy_types()  # type -> its lazy form, same fields and full name
LAZY_FORWARD_BACKWARD = LAZY[pb.ForwardBackwardInput]

# Wire types and the field numbers the reader below knows.
VARINT, LEN = 0, 2
_NUMBER = {f.name: f.number for m in (pb.Datum, pb.Tensor) for f in m.DESCRIPTOR.fields}
LOSS_INPUT_NUMBERS = {f.name: f.number for f in pb.LossFnInputs.DESCRIPTOR.fields}
TENSOR_FIELDS = ("model_input", *LOSS_INPUT_NUMBERS)
TENSOR_WIRE_TYPES = {
    _NUMBER["dtype"]: VARINT,
    **dict.fromkeys((_NUMBER[f] for f in ("shape", *FORMS)), LEN),
}
# The dtype each data form implies (raw_data: its own dtype field).
FORM_DTYPES = np.array([pb.DTYPE_UNSPECIFIED, *(code for code, _ in TYPED_FIELDS.values())])
ITEMSIZES = np.array([1] + [RAW_DTYPES[code].itemsize for code in range(1, len(RAW_DTYPES) + 1)])
INT64_DATA = 0  # a Part's code for int64_data: packed varints
TEMPLATE_MEMBERS = 64  # datums of one size that pay for reading them by a template
TEMPLATE_ROUNDS = 4  # templates tried per size, each on the datums the ones before did not fit
LONG_SPAN = 256  # mean bytes per tensor from which tensors are copied one by one
WORD = 8
VARINT_MASKS = np.array([(1 << 8 * (n + 1)) - 1 for n in range(5)], dtype=np.uint64)  # by length - 1


class Part(NamedTuple):
    """One field's tensors of one wire dtype (`code`, or INT64_DATA) in some plain datums:
    datums (k,), where their data begins in the buffer (k,), its bytes (k,) and
    element counts (k,)."""

    datums: np.ndarray
    code: int
    offsets: np.ndarray
    nbytes: np.ndarray
    counts: np.ndarray

    def elements(self, buf: np.ndarray) -> np.ndarray:
        """(sum(counts),) the tensors' elements, native byte order, datum after datum."""
        if self.code == INT64_DATA:  # plain: each span ends a varint
            return _packed_values(_spans(buf, self.offsets, self.nbytes))
        dtype = RAW_DTYPES[self.code]
        if len(self.offsets) * LONG_SPAN <= self.nbytes.sum():
            values = _spans(buf, self.offsets, self.nbytes)[:-WORD].view(dtype)
        else:  # each element read where it lies
            at = np.ndarray((len(buf) - dtype.itemsize + 1,), dtype, buf, strides=(1,))
            values = at[ranges(self.offsets, self.counts, dtype.itemsize)]
        return values.astype(dtype.newbyteorder("="), copy=False)


def _spans(buf: np.ndarray, offsets: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """(sum(nbytes) + WORD,) uint8: the spans buf[offsets[i]:offsets[i] + nbytes[i]] one after
    another, then WORD zero bytes; sliced one by one where they are long on average."""
    if len(offsets) * LONG_SPAN <= nbytes.sum():
        return np.concatenate(
            [*(buf[o : o + n] for o, n in zip(offsets.tolist(), nbytes.tolist())), np.zeros(WORD, dtype=np.uint8)]
        )
    out = np.zeros(int(nbytes.sum()) + WORD, dtype=np.uint8)
    np.take(buf, ranges(offsets, nbytes), out=out[:-WORD], mode="clip")  # "clip": unbuffered
    return out


def read_data(payloads: list[bytes]) -> tuple[np.ndarray, dict[str, list[Part]], np.ndarray]:
    """The datums' encodings read in parallel: (buffer of them all (bytes,) uint8, field -> its
    tensors in the plain datums, one part per wire dtype; plain (B,) bool). A datum is plain
    when every message in it has known fields of the right wire type, each at most once, and
    every tensor is well-formed raw_data, int64_data, float_data or double_data (or empty).

    Where TEMPLATE_MEMBERS datums or more have one byte size, the first is read in full
    (`_read_messages`) and another whose bytes equal its everywhere but in tensor data, and
    whose packed varints' continuation bits equal its too (checked 8 bytes at a time), has its
    layout: the same tags, lengths, dtypes, shapes and varint lengths. Of those that do not fit
    it, the first is the next template, while the last one fitted TEMPLATE_MEMBERS datums or
    more, for up to TEMPLATE_ROUNDS templates per size (typed tensors of one byte size split
    their bytes between fields in several ways). A template with a tensor whose varints are not
    all of one length is not tried. The rest are read in full."""
    sizes = np.fromiter(map(len, payloads), np.int64, len(payloads))
    buf = np.frombuffer(b"".join([*payloads, bytes(16)]), np.uint8)  # padded: reads may run past the end
    ends = np.cumsum(sizes)
    starts = ends - sizes
    by_size = np.argsort(sizes, kind="stable")
    edges = np.r_[0, np.flatnonzero(np.diff(sizes[by_size])) + 1, len(sizes)]  # of the runs of one size
    members = np.diff(edges)
    few = members < TEMPLATE_MEMBERS
    in_full: list[np.ndarray] = [by_size[np.repeat(few, members)]]  # datums to read in full
    pending = [by_size[edges[g] : edges[g + 1]] for g in np.flatnonzero(~few)]  # each ascending, of one size
    words = np.ndarray((len(buf) - 7,), "<u8", buf, strides=(1,))  # the 8 bytes at each offset
    found: dict[str, list[Part]] = {name: [] for name in TENSOR_FIELDS}
    for _ in range(TEMPLATE_ROUNDS):  # each round: the first datum left of each size is a template
        if not pending:
            break
        firsts = [datums[0] for datums in pending]
        templates = starts[firsts]
        layouts, odd_first = _read_messages(buf, templates, templates + sizes[firsts])
        left: list[np.ndarray] = []
        for g, (datums, start) in enumerate(zip(pending, templates)):
            if odd_first[g]:
                in_full.append(datums)
                continue
            tensors = [
                (f, c, o - start, b, n) for _, f, c, o, b, n in zip(*(a[layouts[0] == g].tolist() for a in layouts))
            ]
            if not all(_one_length(buf[start + o : start + o + b], n) for _, c, o, b, n in tensors if c == INT64_DATA):
                in_full.append(datums)  # few others would share where its varints lie
                continue
            size = sizes[datums[0]]
            structure = np.full(-(-size // 8) * 8, 0xFF, dtype=np.uint8)  # in whole words
            structure[size:] = 0
            for _, code, offset, nbytes, _ in tensors:  # a varint's continuation bits are structure
                structure[offset : offset + nbytes] = 0x80 if code == INT64_DATA else 0
            mask = structure.view("<u8")
            cols = np.flatnonzero(mask)
            seen = words[starts[datums][:, None] + 8 * cols] & mask[cols]
            same = (seen == seen[0]).all(1)  # the template itself among them
            like, unlike = datums[same], datums[~same]
            # Another template only after one that paid off, and for enough datums left.
            (left if min(len(like), len(unlike)) >= TEMPLATE_MEMBERS else in_full).append(unlike)
            for field, code, offset, nbytes, count in tensors:
                found[TENSOR_FIELDS[field]].append(
                    Part(like, code, starts[like] + offset, np.full(len(like), nbytes), np.full(len(like), count))
                )
        pending = left
    in_full += pending
    rest = np.sort(np.concatenate(in_full))
    (message, field, *layout), odd = _read_messages(buf, starts[rest], ends[rest])
    plain = ~odd[message]
    pairs = np.unique(field[plain] * len(ITEMSIZES) + layout[0][plain])  # (field, code) pairs present
    for f, code in zip(*(a.tolist() for a in np.divmod(pairs, len(ITEMSIZES)))):
        these = plain & (field == f) & (layout[0] == code)  # messages ascending within a field
        found[TENSOR_FIELDS[f]].append(Part(rest[message[these]], code, *(a[these] for a in layout[1:])))
    plain_B = np.ones(len(payloads), dtype=bool)
    plain_B[rest[odd]] = False
    return buf, {name: _by_dtype(parts) for name, parts in found.items()}, plain_B


def _one_length(data: np.ndarray, count: int) -> bool:
    """Whether the `count` packed varints in `data` (bytes,), each of at most 5 bytes, the last
    ending data, are all of one length."""
    return len(data) % count == 0 and bool((data.reshape(count, -1)[:, :-1] >= 0x80).all())


def _by_dtype(parts: list[Part]) -> list[Part]:
    """The parts merged into one per code (datums ascending within each part merged, not across)."""
    merged = []
    for code in {part.code for part in parts}:
        these = [part for part in parts if part.code == code]
        if len(these) > 1:
            these = [
                Part(
                    np.concatenate([p.datums for p in these]),
                    code,
                    *(np.concatenate(a) for a in zip(*(p[2:] for p in these))),
                )
            ]
        merged += these
    return merged


def _read_messages(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The Datum messages buf[starts[m]:ends[m]] read in full, level by level (Datum,
    LossFnInputs, Tensor), in parallel: their tensors, (message, field index in TENSOR_FIELDS,
    code, data offset, data bytes, element count) (T,) each, the messages ascending within a
    field; and odd (M,): the messages that are not plain (see `read_data`)."""
    model, loss_inputs = _NUMBER["model_input"], _NUMBER["loss_fn_inputs"]
    datum, datum_end, odd = _fields(buf, starts, ends, {model: LEN, loss_inputs: LEN})
    odd |= datum[:, model] < 0  # no model_input: protobuf's decoder names it
    with_inputs = np.flatnonzero(datum[:, loss_inputs] >= 0)
    end = datum_end[with_inputs, loss_inputs]
    inputs, inputs_end, odd_inputs = _fields(
        buf, end - datum[with_inputs, loss_inputs], end, dict.fromkeys(LOSS_INPUT_NUMBERS.values(), LEN)
    )
    odd[with_inputs[odd_inputs]] = True
    has_model = np.flatnonzero(datum[:, model] >= 0)
    spans = [(has_model, datum[has_model, model], datum_end[has_model, model])]
    for number in LOSS_INPUT_NUMBERS.values():  # (messages, tensor lengths, tensor ends) of each field
        given = np.flatnonzero(inputs[:, number] >= 0)
        spans.append((with_inputs[given], inputs[given, number], inputs_end[given, number]))
    owner, length, stop = (np.concatenate(a) for a in zip(*spans))  # (T,) each tensor's
    field = np.repeat(np.arange(len(spans)), [len(m) for m, _, _ in spans])
    tensor, tensor_end, odd_tensor = _fields(buf, stop - length, stop, TENSOR_WIRE_TYPES)
    *data, bad = _tensor_data(buf, tensor, tensor_end)
    odd[owner[odd_tensor | bad]] = True
    return (owner, field, *data), odd


def _tensor_data(buf: np.ndarray, value: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, ...]:
    """The data of T tensors from their fields (`_fields`' tables (T, 8)): (codes, data
    offsets, data bytes, element counts, bad) (T,) each; bad marks those not plain."""
    rows = np.arange(len(value))
    code = np.maximum(value[:, _NUMBER["dtype"]], 0)
    numbers = np.array([_NUMBER[f] for f in FORMS])
    given = value[:, numbers] > 0  # (T, 4): an empty form is as good as none
    form = np.where(given.any(1), given.argmax(1), -1)
    dtypes = np.where(form > 0, FORM_DTYPES[form], np.where((form < 0) & (code == 0), pb.DTYPE_INT64, code))
    nbytes = np.where(form >= 0, value[rows, numbers[form]], 0)
    offsets = end[rows, numbers[form]] - nbytes
    itemsize = ITEMSIZES[np.clip(dtypes, 0, len(ITEMSIZES) - 1)]
    counts = nbytes // itemsize
    packed = form == FORMS.index("int64_data")
    varints = np.flatnonzero(packed)
    counts[varints], ok = _packed(buf, offsets[varints], nbytes[varints])
    bad = (
        (given.sum(1) > 1)
        | (dtypes < 1)
        | (dtypes >= len(ITEMSIZES))
        | ((form > 0) & (code != 0) & (code != dtypes))
        | (nbytes % itemsize != 0) & ~packed
    )
    bad[varints] |= ~ok
    shape = _NUMBER["shape"]
    has_shape = np.flatnonzero(value[:, shape] > 0)  # then it must be one varint: the count
    size, size_end = _varint(buf, end[has_shape, shape] - value[has_shape, shape])
    bad[has_shape] |= (size_end != end[has_shape, shape]) | (size != counts[has_shape])
    dtypes[varints] = INT64_DATA
    return dtypes, offsets, nbytes, counts, bad


def _packed(buf: np.ndarray, offsets: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed varints in the spans buf[offsets[i]:offsets[i] + nbytes[i]] (each non-empty):
    (counts (k,), ok (k,)): the span ends a varint and none is over 5 bytes (ids >= 2**35 are
    left to protobuf)."""
    ends = np.flatnonzero(_spans(buf, offsets, nbytes)[:-WORD] < 0x80)  # each varint's last byte
    last = np.cumsum(nbytes) - 1  # each span's last byte
    after = np.searchsorted(ends, last, side="right")  # varints ending in this span or before
    counts = np.diff(after, prepend=0)
    ok = np.zeros(len(offsets), dtype=bool)
    ok[counts > 0] = ends[after[counts > 0] - 1] == last[counts > 0]
    long = np.flatnonzero(np.diff(ends, prepend=-1) > 5)  # at a span's start, possibly counted from the span before
    ok[np.searchsorted(last, ends[long])] = False
    return counts, ok


def _packed_values(data: np.ndarray) -> np.ndarray:
    """(k,) int64: the packed varints in data[:-WORD] (uint8, then WORD bytes of padding), each
    of at most 5 bytes, the last ending data[:-WORD]. Each is read as the 8-byte word at its first
    byte, cut to its length, with its 7-bit groups closed up."""
    ends = np.flatnonzero(data[:-WORD] < 0x80)
    first = np.zeros_like(ends)
    first[1:] = ends[:-1] + 1
    words = np.ndarray((len(data) - WORD + 1,), "<u8", data, strides=(1,))
    word = words[first] & VARINT_MASKS[ends - first]
    value = word & np.uint64(0x7F)
    for place in range(1, 5):
        value |= (word >> np.uint64(place)) & np.uint64(0x7F << 7 * place)
    return value.view(np.int64)


def _fields(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, wire_types: dict[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fields of the M messages buf[starts[m]:ends[m]], read in parallel, one field of every
    message per round. Field f (below 16: one-byte tags) must have wire type wire_types[f] and
    appear at most once. Returns value, end (M, max f + 2) int64: a VARINT's value or a LEN
    field's byte length (its bytes end at `end`), -1 where absent; and odd (M,): messages with
    anything else (another field, wire type or tag, a repeated field, a varint over 5 bytes, a
    field past the message's end)."""
    width = max(wire_types) + 1  # column `width`: any other field
    expected = np.full(width + 1, -1)
    expected[list(wire_types)] = list(wire_types.values())
    value = np.full((len(starts), width + 1), -1, dtype=np.int64)
    end = value.copy()
    odd = np.zeros(len(starts), dtype=bool)
    msg = np.flatnonzero(starts < ends)
    pos, msg_end = starts[msg], ends[msg]
    while msg.size:
        tag = buf[pos].astype(np.int64)
        number, wire = np.minimum(tag >> 3, width), tag & 7
        field_value, stop = _varint(buf, pos + 1)
        stop += field_value * (wire == LEN)
        bad = (expected[number] != wire) | (field_value < 0) | (stop > msg_end) | (value[msg, number] >= 0)
        if bad.any():
            odd[msg[bad]] = True
            keep = ~bad
            msg, msg_end, number, field_value, stop = (
                msg[keep],
                msg_end[keep],
                number[keep],
                field_value[keep],
                stop[keep],
            )
        value[msg, number] = field_value
        end[msg, number] = stop
        more = stop < msg_end
        if not more.all():
            msg, msg_end, stop = msg[more], msg_end[more], stop[more]
        pos = stop
    return value, end, odd


def _varint(buf: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The varints at `pos` (k,): (values, where each ends) (k,) int64; -1 both for one over 5 bytes."""
    byte = buf[pos].astype(np.int64)
    value, end = byte & 0x7F, pos + 1
    more = np.flatnonzero(byte >= 0x80)
    for shift in (7, 14, 21, 28):
        if not more.size:
            return value, end
        byte = buf[end[more]].astype(np.int64)
        value[more] |= (byte & 0x7F) << shift
        end[more] += 1
        more = more[byte >= 0x80]
    value[more] = end[more] = -1
    return value, end


def ranges(starts: np.ndarray, lengths: np.ndarray, step: int = 1) -> np.ndarray:
    """starts[i] + step * j for j < lengths[i], for each i in turn: (sum(lengths),) int64."""
    if (lengths == 1).all():
        return starts
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first * step, lengths) + np.arange(int(lengths.sum())) * step
