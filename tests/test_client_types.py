"""The Python client without a server: types, wire conversions, errors, futures, failure paths."""

import asyncio
import concurrent.futures
import pickle
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cispo.client import (
    AdamParams,
    APIFuture,
    CispoError,
    Datum,
    FailedPreconditionError,
    FieldViolation,
    ForwardBackwardOutput,
    InvalidArgumentError,
    ModelInput,
    ResourceExhaustedError,
    TensorData,
    TrainingClient,
    UnavailableError,
    wire,
)
from cispo.client.errors import error_from_rpc_error, error_from_status
from cispo.v1 import training_pb2 as pb

try:  # the client does not need torch; the tests use it, when present, as an input type
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

TOKENS = [5, 7, 11, 13]
TARGETS = [7, 11, 13, 17]
LOGPROBS = [-0.5, -1.25, -0.125, -2.0]  # exact in float32
ADVANTAGES = [0.0, 1.0, 1.0, -0.5]


def make_datum(convert) -> Datum:
    return Datum(
        model_input=ModelInput.from_ints(convert(TOKENS, "int")),
        loss_fn_inputs={
            "target_tokens": convert(TARGETS, "int"),
            "logprobs": convert(LOGPROBS, "float"),
            "advantages": convert(ADVANTAGES, "float"),
        },
    )


CONVERTERS = {
    "list": lambda values, kind: list(values),
    "tuple": lambda values, kind: tuple(values),
    "numpy": lambda values, kind: np.asarray(values, dtype=np.int64 if kind == "int" else np.float32),
    "torch": lambda values, kind: torch.tensor(values, dtype=torch.int64 if kind == "int" else torch.float32),
    "tensordata": lambda values, kind: TensorData(values, dtype="int64" if kind == "int" else "float32"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the package itself -----------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = "import cispo.client, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- inputs: every form encodes the same bytes -------------------------------------------------


@pytest.mark.parametrize("form", sorted(CONVERTERS))
def test_lists_arrays_tensors_encode_identically(form):
    if form == "torch" and torch is None:
        pytest.skip("torch is not installed")
    reference = wire.datum_to_pb(make_datum(CONVERTERS["list"])).SerializeToString()
    assert wire.datum_to_pb(make_datum(CONVERTERS[form])).SerializeToString() == reference


def test_fast_path_layout():
    message = wire.datum_to_pb(make_datum(CONVERTERS["list"]))
    assert message.model_input.dtype == pb.DTYPE_INT64
    assert list(message.model_input.shape) == [4]
    assert message.model_input.raw_data == np.asarray(TOKENS, "<i8").tobytes()
    logprobs = message.loss_fn_inputs.logprobs
    assert (logprobs.dtype, list(logprobs.shape)) == (pb.DTYPE_FLOAT32, [4])
    assert logprobs.raw_data == np.asarray(LOGPROBS, "<f4").tobytes()
    assert not message.loss_fn_inputs.HasField("weights")
    assert len(logprobs.float_data) == 0 and len(logprobs.double_data) == 0


@pytest.mark.parametrize(
    ("value", "kind", "dtype"),
    [
        ([0.5, 1.0], "float", "float32"),  # lists take the field's dtype
        ([0, 1], "float", "float32"),  # integer advantages become floats
        (np.array([0.5, 1.0], np.float64), "float", "float64"),  # float64 given: kept
        (np.array([0.5, 1.0], np.float16), "float", "float32"),
        (np.array([True, False]), "float", "float32"),
        (np.array([1, 2], np.int32), "int", "int32"),
        (np.array([1, 2], np.uint8), "int", "int64"),
        (np.array([1, 2], ">i8"), "int", "int64"),  # big-endian input, native storage
        (np.array([], np.float64), "int", "int64"),  # empty: the server judges the length
    ],
)
def test_dtype_normalization(value, kind, dtype):
    name = "target_tokens" if kind == "int" else "advantages"
    datum = Datum(model_input=[1, 2], loss_fn_inputs={name: value})
    tensor = datum.loss_fn_inputs[name]
    assert tensor.dtype == dtype
    assert tensor.to_numpy().dtype.isnative
    np.testing.assert_array_equal(tensor.to_numpy(), np.asarray(value).astype(dtype))
    message = wire.datum_to_pb(datum)
    assert getattr(message.loss_fn_inputs, name).dtype == pb.DType.Value(f"DTYPE_{dtype.upper()}")


@needs_torch
def test_torch_tensors_of_every_sort():
    grad = torch.tensor([-0.5, -1.0], requires_grad=True) * 1.0  # part of a graph
    strided = torch.arange(8, dtype=torch.int64)[::2]
    bf16 = torch.tensor([-0.5, -1.0], dtype=torch.bfloat16)
    negated = torch.tensor([0.5, 1.0]).neg().conj()
    assert TensorData.from_torch(grad).tolist() == [-0.5, -1.0]
    assert TensorData.from_torch(strided).tolist() == [0, 2, 4, 6]
    assert TensorData.from_torch(bf16).dtype == "float32"
    assert TensorData.from_torch(negated).tolist() == [-0.5, -1.0]
    assert torch.equal(TensorData([1.5, 2.5]).to_torch(), torch.tensor([1.5, 2.5]))


def test_numpy_input_is_not_copied():
    array = np.array(LOGPROBS, np.float32)
    datum = Datum(model_input=TOKENS, loss_fn_inputs={"logprobs": array})
    assert datum.loss_fn_inputs["logprobs"].to_numpy() is array


# --- inputs: clear errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (np.zeros((2, 3), np.float32), ValueError, r"advantages: expected a 1-D tensor, got shape \(2, 3\)"),
        pytest.param("torch-2d", ValueError, "1-D", marks=needs_torch, id="torch-2d"),
        (np.float32(1.0), ValueError, "1-D"),
        (["a", "b"], ValueError, "numeric"),
        ([[1.0, 2.0], [3.0]], ValueError, "flat sequence"),
        (np.array([1 + 2j]), ValueError, "numeric"),
        ({"a": 1}, TypeError, "expected a list, numpy array, torch tensor or TensorData"),
    ],
)
def test_bad_loss_inputs(value, error, match):
    if isinstance(value, str) and value == "torch-2d":
        value = torch.zeros(2, 3)
    with pytest.raises(error, match=match):
        Datum(model_input=[1, 2], loss_fn_inputs={"advantages": value})


def test_bad_tokens_and_keys():
    with pytest.raises(ValueError, match="target_tokens: expected integer token ids, got dtype float64"):
        Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": np.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="integer token ids"):
        ModelInput.from_ints([1.5, 2.0])
    with pytest.raises(ValueError, match="integer token ids"):
        ModelInput.from_ints(np.array([True, False]))
    with pytest.raises(ValueError, match="unknown input 'mask'"):
        Datum(model_input=[1, 2], loss_fn_inputs={"mask": [1, 1]})
    with pytest.raises(TypeError, match=r"data\[1\]: expected cispo.client.Datum, got dict"):
        wire.forward_backward_input_to_pb([make_datum(CONVERTERS["list"]), {"model_input": [1]}])
    with pytest.raises(TypeError, match="expected a list of Datum"):
        wire.forward_backward_input_to_pb(make_datum(CONVERTERS["list"]))
    with pytest.raises(TypeError, match=r"loss_fn_config\['clip_high_threshold'\]"):
        wire.forward_backward_input_to_pb([], "cispo", {"clip_high_threshold": "4"})


def test_values_are_left_to_the_server():
    """Length mismatches, positive logprobs and NaN are the server's field violations to report."""
    datum = Datum(
        model_input=[1, 2, 3],
        loss_fn_inputs={"target_tokens": [1], "logprobs": [0.5, float("nan")], "advantages": [0.0]},
    )
    message = wire.datum_to_pb(datum)
    assert list(message.loss_fn_inputs.logprobs.shape) == [2]


# --- round trips ------------------------------------------------------------------------------------


def test_forward_backward_input_round_trip():
    data = [make_datum(CONVERTERS["numpy"]), Datum(model_input=[3], loss_fn_inputs={"weights": [0.25]})]
    config = {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    message = wire.forward_backward_input_to_pb(data, "cispo", config)
    decoded = pb.ForwardBackwardInput.FromString(message.SerializeToString())
    assert decoded.loss_fn == "cispo"
    assert dict(decoded.loss_fn_config) == config
    for datum, datum_pb in zip(data, decoded.data, strict=True):
        back = wire.datum_from_pb(datum_pb)
        assert back.model_input.to_ints() == datum.model_input.to_ints()
        assert back.loss_fn_inputs == datum.loss_fn_inputs


@pytest.mark.parametrize("dtype", ["int64", "int32", "float32", "float64"])
def test_tensor_round_trip_keeps_dtype(dtype):
    tensor = TensorData([1, 2, 3], dtype=dtype)
    back = wire.tensor_from_pb(pb.Tensor.FromString(wire.tensor_to_pb(tensor).SerializeToString()))
    assert back == tensor and back.dtype == dtype


def test_stream_request_built_in_place():
    request = pb.StreamRequest()
    wire.forward_backward_input_to_pb([make_datum(CONVERTERS["list"])], out=request.forward_backward)
    assert request.WhichOneof("op") == "forward_backward"
    empty = pb.StreamRequest()
    wire.forward_backward_input_to_pb([], "", out=empty.forward)
    assert empty.WhichOneof("op") == "forward"


# --- decoding: raw bytes and typed fields --------------------------------------------------------


def test_raw_and_typed_decode_agree():
    values = np.array([-0.5, -1.25, 0.0], np.float32)
    raw = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], raw_data=values.astype("<f4").tobytes())
    typed = pb.Tensor(float_data=values.tolist())
    typed_declared = pb.Tensor(dtype=pb.DTYPE_FLOAT32, float_data=values.tolist())
    for message in (raw, typed, typed_declared):
        tensor = wire.tensor_from_pb(message)
        assert tensor.dtype == "float32"
        np.testing.assert_array_equal(tensor.to_numpy(), values)
    assert wire.tensor_from_pb(pb.Tensor(int64_data=[1, 2])).to_numpy().dtype == np.int64
    assert wire.tensor_from_pb(pb.Tensor(double_data=[0.5])).dtype == "float64"
    assert wire.tensor_from_pb(pb.Tensor(dtype=pb.DTYPE_INT32)).shape == [0]


def test_decoded_arrays_are_writable_native_copies():
    message = pb.Tensor(dtype=pb.DTYPE_INT64, raw_data=np.arange(3, dtype="<i8").tobytes())
    array = wire.tensor_from_pb(message).to_numpy()
    array += 1  # no "read-only" error
    assert array.tolist() == [1, 2, 3] and array.dtype.isnative


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, raw_data=b"\0" * 6), "6 is not a multiple of 4"),
        (pb.Tensor(raw_data=b"\0" * 8), "raw_data needs a dtype"),
        (pb.Tensor(dtype=pb.DTYPE_INT64, raw_data=b"\0" * 8, int64_data=[1]), "more than one"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT64, float_data=[1.0]), "disagrees with float_data"),
        (pb.Tensor(shape=[2, 1], int64_data=[1, 2]), r"shape \[2, 1\] does not match 2"),
    ],
)
def test_malformed_tensors(message, match):
    with pytest.raises(ValueError, match=match):
        wire.tensor_from_pb(message, "x")


def test_response_decoding():
    logprobs = np.array([-0.5, -0.25], np.float32)
    output = wire.forward_backward_output_from_pb(
        pb.ForwardBackwardOutput(
            loss_fn_outputs=[
                pb.LossFnOutput(logprobs=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], raw_data=logprobs.tobytes())),
                pb.LossFnOutput(logprobs=pb.Tensor(float_data=[-1.0])),
            ],
            metrics={"loss:sum": 1.5, "tokens:sum": 3.0},
        )
    )
    assert isinstance(output, ForwardBackwardOutput)
    np.testing.assert_array_equal(output.loss_fn_outputs[0]["logprobs"].to_numpy(), logprobs)
    assert output.loss_fn_outputs[1]["logprobs"].tolist() == [-1.0]
    assert output.metrics["loss:sum"] == 1.5

    step = wire.optim_step_response_from_pb(pb.OptimStepResponse(grad_norm=2.5, step=3, metrics={"grad_norm:max": 2.5}))
    assert (step.grad_norm, step.step, step.metrics) == (2.5, 3, {"grad_norm:max": 2.5})
    saved = wire.save_state_response_from_pb(pb.SaveStateResponse(name="a", path="/ckpt/a", step=3))
    assert (saved.name, saved.path, saved.step) == ("a", "/ckpt/a", 3)
    info = wire.get_info_response_from_pb(
        pb.GetInfoResponse(
            model_name="m",
            vocab_size=100,
            loss_functions=[
                pb.LossFunctionInfo(
                    name="cispo",
                    default_config={"clip_high_threshold": 4.0},
                    required_inputs=["logprobs", "advantages"],
                )
            ],
            limits=pb.Limits(
                max_message_bytes=10,
                max_tokens_per_request=20,
                max_sequence_length=30,
                idempotency_keys_remembered=40,
                max_data_per_request=50,
            ),
        )
    )
    assert info.loss_functions[0].default_config == {"clip_high_threshold": 4.0}
    assert info.limits.max_tokens_per_request == 20 and info.vocab_size == 100
    assert (info.limits.idempotency_keys_remembered, info.limits.max_data_per_request) == (40, 50)


# --- small types ------------------------------------------------------------------------------------


def test_model_input():
    model_input = ModelInput.from_ints(np.array([1, 2], np.int32)).append_int(3)
    assert model_input.to_ints() == [1, 2, 3]
    assert model_input.length == 3 and len(model_input.chunks) == 2
    assert model_input.to_numpy().dtype == np.int64
    assert ModelInput.empty().length == 0 and ModelInput.empty().to_ints() == []


def test_tensor_data_api():
    tensor = TensorData(data=[1.0, 2.0], dtype="float32", shape=[2])
    assert (tensor.dtype, tensor.shape, tensor.tolist(), tensor.data, len(tensor)) == (
        "float32",
        [2],
        [1.0, 2.0],
        [1.0, 2.0],
        2,
    )
    assert tensor == TensorData.from_numpy(np.array([1, 2], np.float32))
    assert tensor != TensorData([1.0, 2.0], dtype="float64")
    assert TensorData([float("nan")]) == TensorData([float("nan")])
    with pytest.raises(ValueError, match="shape"):
        TensorData([1.0], shape=[2])
    with pytest.raises(ValueError, match="dtype must be one of"):
        TensorData([1.0], dtype="bfloat16")


def test_adam_params():
    assert wire.adam_params_to_pb(None) == wire.adam_params_to_pb(AdamParams())
    message = wire.adam_params_to_pb(AdamParams(learning_rate=3e-5, grad_clip_norm=1))
    assert [f.name for f, _ in message.ListFields()] == [
        "learning_rate",
        "beta1",
        "beta2",
        "eps",
        "weight_decay",
        "grad_clip_norm",
    ]
    assert (message.learning_rate, message.beta2, message.eps, message.grad_clip_norm) == (
        3e-5,
        0.95,
        1e-12,
        1.0,
    )
    with pytest.raises(TypeError, match="learning_rate"):
        AdamParams(learning_rate="1e-4")


# --- errors -----------------------------------------------------------------------------------------


def bad_request_status() -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="data[3].loss_fn_inputs.logprobs", description="length 17 != model_input length 18"
                )
            ]
        )
    )
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad batch", details=[detail])


def test_error_from_status():
    error = error_from_status(bad_request_status())
    assert isinstance(error, InvalidArgumentError) and isinstance(error, CispoError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.message == "bad batch"
    assert error.field_violations == [
        FieldViolation("data[3].loss_fn_inputs.logprobs", "length 17 != model_input length 18")
    ]
    assert "data[3].loss_fn_inputs.logprobs: length 17 != model_input length 18" in str(error)
    assert isinstance(error.details[0], error_details_pb2.BadRequest)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InvalidArgumentError and copy.field_violations == error.field_violations

    for code, cls in [
        (code_pb2.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (code_pb2.FAILED_PRECONDITION, FailedPreconditionError),
        (code_pb2.UNAVAILABLE, UnavailableError),
        (code_pb2.INTERNAL, CispoError),
    ]:
        error = error_from_status(status_pb2.Status(code=code, message="m"))
        assert type(error) is cls and error.code.value[0] == code


def test_error_from_rpc_error_reads_the_details_trailer():
    class FakeCall(grpc.RpcError):  # the grpc.Call surface of a failed unary call
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "bad batch"

        def trailing_metadata(self):
            return (("grpc-status-details-bin", bad_request_status().SerializeToString()),)

    error = error_from_rpc_error(FakeCall())
    assert isinstance(error, InvalidArgumentError) and len(error.field_violations) == 1


# --- futures -----------------------------------------------------------------------------------------


def test_api_future_sync_and_async():
    source = concurrent.futures.Future()
    future = APIFuture(source, "7")
    assert not future.done()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)

    async def wait_then_resolve():
        with pytest.raises(TimeoutError):
            await future.result_async(timeout=0.01)
        waiter = asyncio.ensure_future(future.result_async())
        await asyncio.sleep(0)
        waiter.cancel()  # cancelling a waiter does not cancel the operation
        await asyncio.sleep(0)
        assert not source.cancelled()
        asyncio.get_running_loop().call_later(0.01, source.set_result, "answer")
        return await future.result_async(), await future

    assert asyncio.run(wait_then_resolve()) == ("answer", "answer")
    assert future.result() == "answer" and future.done() and future.exception() is None

    failed = APIFuture(concurrent.futures.Future())
    failed.future().set_exception(InvalidArgumentError("bad"))
    with pytest.raises(InvalidArgumentError):
        failed.result()
    with pytest.raises(InvalidArgumentError):
        asyncio.run(failed.result_async())


# --- the client without a server ------------------------------------------------------------------


def test_client_is_lazy_and_checks_sizes():
    client = TrainingClient("127.0.0.1:1", max_message_bytes=1000)
    assert client._transport._thread is None  # nothing connects before the first call
    big = Datum(model_input=np.arange(200), loss_fn_inputs={"target_tokens": np.arange(200)})
    with pytest.raises(ResourceExhaustedError, match="over max_message_bytes=1000"):
        client.forward_backward([big])
    with pytest.raises(ResourceExhaustedError):
        asyncio.run(client.forward_backward_async([big]))
    with pytest.raises(ValueError, match="1-D"):
        asyncio.run(client.forward_async([Datum(model_input=[1], loss_fn_inputs={"weights": np.ones((1, 1))})]))
    assert client._transport._thread is None
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get_info()


def test_unreachable_server_fails_with_unavailable():
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    with TrainingClient(target, timeout=30) as client:
        with pytest.raises(UnavailableError):
            client.get_info()

        async def pipelined():
            futures = [await client.forward_backward_async([make_datum(CONVERTERS["list"])]) for _ in range(3)]
            futures.append(await client.optim_step_async())
            for future in futures:
                with pytest.raises(UnavailableError):
                    await future.result_async(timeout=30)
            return [future.request_id for future in futures]

        assert asyncio.run(pipelined()) == ["2", "3", "4", "5"]  # get_info was request 1
        # The broken stream is replaced on the next call (in a new event loop, too).
        assert asyncio.run(pipelined()) == ["6", "7", "8", "9"]
