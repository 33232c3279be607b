"""Checkpoints with lifetimes over real gRPC against a real server: user metadata and ttl_seconds
stored with a save (in its manifest) and listed, per identity; GetCheckpoint by path;
DeleteCheckpoint, owner-checked; expired checkpoints deleted by the sweeper; the per-identity
--max-checkpoint-bytes refusing a save before anything is written; bad labels refused."""

import collections
import json
import random
import time
from pathlib import Path

import fuzz_messages as fm
import grpc
import pytest
import requests
from server_process import ServerProcess

from cispo.client import ServiceClient
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

ALICE, BOB = "alice-0123456789abcdef", "bob-fedcba9876543210xyz"
STATE, SAMPLER = pb.CHECKPOINT_KIND_STATE, pb.CHECKPOINT_KIND_SAMPLER_WEIGHTS
SWEEP_WAIT_SECONDS = 60


def auth(token):
    return (("authorization", f"Bearer {token}"),) if token else ()


def tokens_file(directory: Path) -> str:
    path = directory / "tokens"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        "--auth-tokens-file",
        tokens_file(tmp_path_factory.mktemp("tokens")),
        "--checkpoint-sweep-seconds",
        "0.2",
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel)


@pytest.fixture(scope="module")
def runs(stub):
    """A LoRA run of each identity's."""
    return {
        token: stub.CreateModel(pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=4)), metadata=auth(token))
        for token in (ALICE, BOB)
    }


def listed(stub, token, **kwargs):
    answer = stub.ListCheckpoints(pb.ListCheckpointsRequest(**kwargs), metadata=auth(token))
    return {(c.name, c.kind): c for c in answer.checkpoints}


def refused(call, code):
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, error.value.details()
    return error.value.details()


def test_metadata_and_lifetime_are_stored_with_the_save_and_listed(stub, runs):
    run = runs[ALICE].model_id
    before = time.time()
    state = stub.SaveState(
        pb.SaveStateRequest(
            name="meta-state", model_id=run, user_metadata={"purpose": "eval", "é": "ü"}, ttl_seconds=3600
        ),
        metadata=auth(ALICE),
    )
    export = stub.SaveWeightsForSampler(
        pb.SaveWeightsForSamplerRequest(name="meta-export", model_id=run, user_metadata={"k": "v"}),
        metadata=auth(ALICE),
    )
    mine = listed(stub, ALICE)
    saved = mine["meta-state", STATE]
    assert saved.path == state.path and saved.step == state.step and saved.run_id == run
    assert dict(saved.user_metadata) == {"purpose": "eval", "é": "ü"}
    assert saved.created_time >= before - 1 and saved.HasField("expires_time")
    assert 3500 < saved.expires_time - saved.created_time <= 3600
    assert saved.size_bytes > 0 and saved.lora_config.rank == 4
    exported = mine["meta-export", SAMPLER]
    assert exported.path == export.path and dict(exported.user_metadata) == {"k": "v"}
    assert not exported.HasField("expires_time") and exported.lora_config.rank == 4
    manifest = json.loads((Path(state.path) / "manifest.json").read_text())  # written with the state
    assert manifest["user_metadata"] == {"purpose": "eval", "é": "ü"} and manifest["expires"] == saved.expires_time
    # filters: kind, run, name prefix
    assert set(listed(stub, ALICE, kind=SAMPLER)) == {("meta-export", SAMPLER)}
    assert ("meta-state", STATE) in listed(stub, ALICE, run_id=run) and not listed(stub, ALICE, run_id="run-none")
    assert set(listed(stub, ALICE, name_prefix="meta-s")) == {("meta-state", STATE)}
    # GetCheckpoint by the path a save answered, or by name and kind
    by_path = stub.GetCheckpoint(pb.GetCheckpointRequest(name=export.path), metadata=auth(ALICE)).checkpoint
    assert by_path == exported
    by_name = stub.GetCheckpoint(pb.GetCheckpointRequest(name="meta-state", kind=STATE), metadata=auth(ALICE))
    assert by_name.checkpoint == saved
    message = refused(
        lambda: stub.GetCheckpoint(pb.GetCheckpointRequest(name="meta-state"), metadata=auth(ALICE)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "kind" in message


def test_an_identity_lists_gets_and_deletes_only_its_own(stub, runs):
    state = stub.SaveState(pb.SaveStateRequest(name="alices", model_id=runs[ALICE].model_id), metadata=auth(ALICE))
    stub.SaveState(pb.SaveStateRequest(name="bobs", model_id=runs[BOB].model_id), metadata=auth(BOB))
    assert ("alices", STATE) not in listed(stub, BOB) and ("bobs", STATE) in listed(stub, BOB)
    assert ("bobs", STATE) not in listed(stub, ALICE)
    for call in (
        lambda: stub.GetCheckpoint(pb.GetCheckpointRequest(name=state.path), metadata=auth(BOB)),
        lambda: stub.GetCheckpoint(pb.GetCheckpointRequest(name="alices", kind=STATE), metadata=auth(BOB)),
        lambda: stub.DeleteCheckpoint(pb.DeleteCheckpointRequest(name=state.path), metadata=auth(BOB)),
        lambda: stub.DeleteCheckpoint(pb.DeleteCheckpointRequest(name="alices", kind=STATE), metadata=auth(BOB)),
    ):
        refused(call, grpc.StatusCode.FAILED_PRECONDITION)  # as a missing one
    assert ("alices", STATE) in listed(stub, ALICE)


def test_delete_removes_the_checkpoint_and_a_load_then_answers_missing(stub, runs):
    run = runs[ALICE].model_id
    state = stub.SaveState(pb.SaveStateRequest(name="doomed", model_id=run), metadata=auth(ALICE))
    export = stub.SaveWeightsForSampler(
        pb.SaveWeightsForSamplerRequest(name="doomed-export", model_id=run), metadata=auth(ALICE)
    )
    sample = pb.SampleRequest(
        prompt=pb.Tensor(int64_data=[1, 2, 3]),
        sampling_params=pb.SamplingParams(max_tokens=1, seed=1),
        model_path=export.path,
        model_id=run,
    )
    stub.Sample(sample, metadata=auth(ALICE))  # the export is loaded (and cached)
    deleted = stub.DeleteCheckpoint(
        pb.DeleteCheckpointRequest(name="doomed", kind=STATE, model_id=run, idempotency_key="d1"), metadata=auth(ALICE)
    )
    assert deleted.checkpoint.name == "doomed" and deleted.checkpoint.path == state.path
    retried = stub.DeleteCheckpoint(
        pb.DeleteCheckpointRequest(name="doomed", kind=STATE, model_id=run, idempotency_key="d1"), metadata=auth(ALICE)
    )
    assert retried == deleted
    assert not Path(state.path).exists()
    refused(
        lambda: stub.LoadState(pb.LoadStateRequest(name="doomed", model_id=run), metadata=auth(ALICE)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    stub.DeleteCheckpoint(
        pb.DeleteCheckpointRequest(name=export.path), metadata=auth(ALICE)
    )  # by path, kind told by it
    assert ("doomed-export", SAMPLER) not in listed(stub, ALICE)
    refused(
        lambda: stub.GetCheckpoint(pb.GetCheckpointRequest(name=export.path), metadata=auth(ALICE)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    refused(lambda: stub.Sample(sample, metadata=auth(ALICE)), grpc.StatusCode.FAILED_PRECONDITION)  # not cached


def test_expired_checkpoints_are_swept(server, stub, runs):
    run = runs[ALICE].model_id
    stub.SaveState(pb.SaveStateRequest(name="ephemeral", model_id=run, ttl_seconds=1), metadata=auth(ALICE))
    stub.SaveWeightsForSampler(
        pb.SaveWeightsForSamplerRequest(name="ephemeral-export", model_id=run, ttl_seconds=1), metadata=auth(ALICE)
    )
    deadline = time.monotonic() + SWEEP_WAIT_SECONDS
    while {("ephemeral", STATE), ("ephemeral-export", SAMPLER)} & set(listed(stub, ALICE)):
        assert time.monotonic() < deadline, "expired checkpoints were not swept"
        time.sleep(0.2)
    server.wait_for_log("swept expired sampler weights 'ephemeral-export' of alice")
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    assert 'cispo_checkpoints_swept_total{kind="state"}' in metrics
    assert 'cispo_checkpoints_swept_total{kind="sampler_weights"}' in metrics


@pytest.mark.parametrize(
    ("label", "field"),
    [
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": -5}, "ttl_seconds"),
        ({"ttl_seconds": 10**12}, "ttl_seconds"),
        ({"user_metadata": {f"k{i}": "v" for i in range(33)}}, "user_metadata"),
        ({"user_metadata": {"k": "v" * 1025}}, "user_metadata"),
        ({"user_metadata": {"": "v"}}, "user_metadata"),
        ({"user_metadata": {f"k{i}": "v" * 1000 for i in range(9)}}, "user_metadata"),
    ],
)
def test_a_bad_lifetime_or_metadata_is_refused_naming_its_field(stub, runs, label, field):
    run = runs[ALICE].model_id
    for call in (
        lambda: stub.SaveState(pb.SaveStateRequest(name="bad-label", model_id=run, **label), metadata=auth(ALICE)),
        lambda: stub.SaveWeightsForSampler(
            pb.SaveWeightsForSamplerRequest(name="bad-label", model_id=run, **label), metadata=auth(ALICE)
        ),
    ):
        assert field in refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert not {n for n, _ in listed(stub, ALICE)} & {"bad-label"}


def test_a_save_over_max_checkpoint_bytes_is_refused_before_writing(tmp_path, runs):
    lora = pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=4))
    trainable = runs[ALICE].info.num_parameters  # the same model's rank-4 LoRA run
    # A state is estimated at 12 bytes a parameter (weights and both moments) and takes at least
    # its 4 bytes a parameter of weights: one fits in 15, and a second does not.
    limit = 15 * trainable
    checkpoints = tmp_path / "ckpt"
    proc = ServerProcess("--max-checkpoint-bytes", str(limit), checkpoint_dir=checkpoints)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            run = stub.CreateModel(lora).model_id
            stub.SaveState(pb.SaveStateRequest(name="first", model_id=run))
            message = refused(
                lambda: stub.SaveState(pb.SaveStateRequest(name="second", model_id=run)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert f"needs about {12 * trainable} bytes" in message and str(limit) in message
            assert not (checkpoints / "second").exists()
            assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # not even a hidden copy
            stub.SaveState(pb.SaveStateRequest(name="first", model_id=run))  # replacing it frees its bytes
            assert set(listed(stub, None)) == {("first", STATE)}
    finally:
        assert proc.terminate() == 0, proc.log()


def test_the_python_client_saves_lists_gets_and_deletes_checkpoints(server, runs):
    with ServiceClient(server.address, token=ALICE) as service:
        training = service.training_client(runs[ALICE].model_id)
        path = training.save_state("client-state", ttl_seconds=3600, user_metadata={"by": "client"}).result().path
        training.save_weights_for_sampler("client-export", user_metadata={"by": "client"}).result()
        (state,) = service.list_checkpoints(kind="state", name_prefix="client-")
        assert (state.path, state.user_metadata, state.lora_rank) == (path, {"by": "client"}, 4)
        assert state.expires is not None and state.run_id == runs[ALICE].model_id
        assert service.get_checkpoint(path) == state
        exported = service.get_checkpoint("client-export", kind="sampler_weights")
        assert exported.expires is None and exported.user_metadata == {"by": "client"}
        assert service.delete_checkpoint(path) == state
        assert service.delete_checkpoint("client-export", kind="sampler_weights").name == "client-export"
        assert not service.list_checkpoints(name_prefix="client-")
        with pytest.raises(ValueError, match="kind"):
            service.list_checkpoints(kind="weights")


FUZZ_METHODS = {
    "ListCheckpoints": (pb.ListCheckpointsRequest, pb.ListCheckpointsResponse),
    "GetCheckpoint": (pb.GetCheckpointRequest, pb.GetCheckpointResponse),
    "DeleteCheckpoint": (pb.DeleteCheckpointRequest, pb.DeleteCheckpointResponse),
    "RemoveExport": (pb.RemoveExportRequest, pb.RemoveExportResponse),
    "SaveState": (pb.SaveStateRequest, pb.SaveStateResponse),
}
# What a malformed, mistyped or out-of-range request may get: never UNKNOWN or INTERNAL.
CLEAN_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def fuzz_body(rng, method: str, model_id: str) -> bytes:
    """A body for `method`: a well-formed request with random values in the new fields (names,
    kinds, metadata, ttl), then half the time corrupted on the wire."""
    request_type = FUZZ_METHODS[method][0]
    text = rng.choice(["kept", "", "x" * 200, "../etc", "a/b", "\ud7ff", f"{model_id}.fz", "fz"])
    fields = {f.name for f in request_type.DESCRIPTOR.fields}
    request = request_type()
    if "name" in fields:
        request.name = text
    if "kind" in fields:
        request.kind = rng.choice([0, 1, 2, 7, -3])
    if "model_id" in fields:
        request.model_id = rng.choice([model_id, "", "no-such-run", "bad id"])
    if "name_prefix" in fields:
        request.name_prefix = text
    if "ttl_seconds" in fields and rng.random() < 0.7:
        request.ttl_seconds = rng.choice([1, 3600, 0, -1, 2**62, 10 * 365 * 86400 + 1])
    if "user_metadata" in fields:
        for i in range(rng.choice([0, 1, 3, 33])):
            request.user_metadata[rng.choice([f"k{i}", "", "x" * 129])] = rng.choice(["v", "y" * 1025])
    body = request.SerializeToString()
    if rng.random() < 0.5:
        body = rng.choice([fm._random_bytes(rng), fm._truncate(rng, body), fm._bitflip(rng, body)])
        if rng.random() < 0.3:
            body = fm._wrong_wire_type(rng, body)
    return body


def test_fuzzed_checkpoint_requests_get_clean_answers_and_change_nothing_they_refuse(server, stub, runs):
    """Malformed and out-of-range ListCheckpoints, GetCheckpoint, DeleteCheckpoint, RemoveExport
    and SaveState (its metadata and ttl) get a clean code with details; a checkpoint no accepted
    request names stays as it was; the server keeps serving."""
    model_id = runs[ALICE].model_id
    stub.SaveState(pb.SaveStateRequest(name="bystander", model_id=model_id), metadata=auth(ALICE))
    before = listed(stub, ALICE)[("bystander", STATE)]
    rng = random.Random(26)
    with grpc.insecure_channel(server.address) as channel:
        raw = {
            m: channel.unary_unary(
                f"/cispo.v1.TrainingService/{m}", request_serializer=bytes, response_deserializer=types[1].FromString
            )
            for m, types in FUZZ_METHODS.items()
        }
        codes = collections.Counter()
        for _ in range(300):
            method = rng.choice(sorted(FUZZ_METHODS))
            body = fuzz_body(rng, method, model_id)
            try:
                raw[method](body, metadata=auth(ALICE), timeout=60)
                codes[grpc.StatusCode.OK] += 1
            except grpc.RpcError as error:
                assert error.code() in CLEAN_CODES and error.details(), (method, body, error.code(), error.details())  # noqa: PT017  # a fuzzed body may or may not be refused
                codes[error.code()] += 1
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0 and codes[grpc.StatusCode.OK] > 0, codes
    assert listed(stub, ALICE)[("bystander", STATE)] == before
    stub.LoadState(pb.LoadStateRequest(name="bystander", model_id=model_id), metadata=auth(ALICE))
