"""The operations layer: its table matches the gRPC service, and an operation added once
(RemoveExport, the DeleteCheckpoint of sampler weights by name) is served by the gRPC door with the same ownership, idempotency, metrics and log
line as every other."""

import grpc
import pytest
import requests
from server_process import ServerProcess

from cispo.service.operations import OPERATIONS
from cispo.service.servicer import UNARY_METHODS
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

ALICE, BOB = "alice-0123456789abcdef", "bob-fedcba9876543210xyz"


def auth(token):
    return (("authorization", f"Bearer {token}"),)


def test_every_method_of_the_service_is_an_operation_of_the_table():
    service = pb.DESCRIPTOR.services_by_name["TrainingService"]
    unary = {m.name: m for m in service.methods if not m.client_streaming}
    assert set(unary) == set(UNARY_METHODS) == {op.method for op in OPERATIONS.values()}
    for name, method in unary.items():
        op = UNARY_METHODS[name]
        assert OPERATIONS[op.name] is op
        assert op.request.DESCRIPTOR is method.input_type
        assert op.response.DESCRIPTOR is method.output_type
    for field in pb.StreamRequest.DESCRIPTOR.oneofs_by_name["op"].fields:
        assert OPERATIONS[field.name].request.DESCRIPTOR is field.message_type
        assert (
            OPERATIONS[field.name].response.DESCRIPTOR
            is pb.StreamResponse.DESCRIPTOR.fields_by_name[field.name].message_type
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    proc = ServerProcess("--auth-tokens-file", str(tokens), checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    yield proc
    assert proc.terminate() == 0, proc.log()


def test_remove_export_over_grpc_is_owned_idempotent_counted_and_logged(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        saved = stub.SaveWeightsForSampler(pb.SaveWeightsForSamplerRequest(name="exp"), metadata=auth(ALICE))
        with pytest.raises(grpc.RpcError) as theirs:  # bob's home has no "exp": as a missing one
            stub.RemoveExport(pb.RemoveExportRequest(name="exp"), metadata=auth(BOB))
        assert theirs.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        first = stub.RemoveExport(pb.RemoveExportRequest(name="exp", idempotency_key="k1"), metadata=auth(ALICE))
        retried = stub.RemoveExport(pb.RemoveExportRequest(name="exp", idempotency_key="k1"), metadata=auth(ALICE))
        assert first == retried == pb.RemoveExportResponse(name="exp")
        listed = stub.ListCheckpoints(pb.ListCheckpointsRequest(), metadata=auth(ALICE)).checkpoints
        assert "exp" not in [c.name for c in listed]  # RemoveExport is DeleteCheckpoint of sampler weights
        with pytest.raises(grpc.RpcError) as gone:  # a new key runs again: the export is gone
            stub.RemoveExport(pb.RemoveExportRequest(name="exp", idempotency_key="k2"), metadata=auth(ALICE))
        assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as bad:
            stub.RemoveExport(pb.RemoveExportRequest(name="../exp"), metadata=auth(ALICE))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert saved.name == "exp"
    server.wait_for_log("op=remove_export identity=alice")
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    assert 'cispo_request_seconds_count{op="remove_export"} 5.0' in metrics
    assert 'cispo_operation_errors_total{code="FAILED_PRECONDITION",op="remove_export"} 2.0' in metrics
    assert 'cispo_operation_errors_total{code="INVALID_ARGUMENT",op="remove_export"} 1.0' in metrics
