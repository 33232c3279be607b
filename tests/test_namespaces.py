"""Names per identity: each identity's states, exports and default run are its own. Another
identity's names answer exactly as missing ones do, no name can be squatted, and the flat states
and exports of earlier versions still load for their owner. Over gRPC against a real server with
two identities, plus the homes on disk and the HTTP door's check_export."""

import asyncio
import json
import os
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from reference import make_samples
from server_process import ServerProcess

from cispo.service.auth import set_identity
from cispo.service.data_plane import Operations
from cispo.service.metrics import ServiceMetrics
from cispo.service.pipeline import OperationPipeline
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from cispo.worker import AdamParams, EngineConfig, InvalidInput, StateNotFound, load_policy_model, lora
from cispo.worker.checkpoint import load_state, namespace, recover, save_state
from cispo.worker.config import ExportConfig
from cispo.worker.runs import ExpectedVersion, TrainingRuns
from cispo.worker.sampling import SampleRequest, SamplingParams

pytestmark = pytest.mark.timeout(300)
ALICE, BOB = "alice-namespaces-0123456789", "bob-namespaces-9876543210ab"
PROMPT = pb.Tensor(int64_data=[5, 17, 29, 41, 53, 65])


class Caller:
    """One identity's calls to the server."""

    def __init__(self, stub, token: str):
        self.stub, self.metadata = stub, (("authorization", f"Bearer {token}"),)

    def __call__(self, method: str, request):
        return getattr(self.stub, method)(request, metadata=self.metadata)

    def refusal(self, method: str, request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as raised:
            self(method, request)
        return raised.value.code(), raised.value.details()

    def trained_run(self, seed: int) -> str:
        """A new LoRA run, one step away from the base (a new adapter changes nothing)."""
        model_id = self("CreateModel", pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=4, seed=seed))).model_id
        self.step(model_id, seed)
        return model_id

    def step(self, model_id: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        datum = pb.Datum(
            model_input=pb.Tensor(int64_data=rng.integers(0, 1024, 12).tolist()),
            loss_fn_inputs=pb.LossFnInputs(
                target_tokens=pb.Tensor(int64_data=rng.integers(0, 1024, 12).tolist()),
                logprobs=pb.Tensor(float_data=np.full(12, -7.0).tolist()),
                advantages=pb.Tensor(float_data=rng.normal(size=12).tolist()),
            ),
        )
        self("ForwardBackward", pb.ForwardBackwardInput(data=[datum], model_id=model_id))
        self("OptimStep", pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-2), model_id=model_id))

    def weights(self, **where) -> np.ndarray:
        """The prompt's logprobs on the weights a Sample names (`model_id` or `model_path`)."""
        return np.array(
            self("Sample", sample(include_prompt_logprobs=True, typed_outputs=True, **where)).prompt_logprobs.float_data
        )

    def unload_all(self) -> None:
        for model in self("ListModels", pb.ListModelsRequest()).models:
            self("UnloadModel", pb.UnloadModelRequest(model_id=model.model_id))


def sample(**fields) -> pb.SampleRequest:
    return pb.SampleRequest(prompt=PROMPT, sampling_params=pb.SamplingParams(max_tokens=1, seed=1), **fields)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("namespaces")
    (root / "tokens").write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    proc = ServerProcess(
        "--auth-tokens-file", str(root / "tokens"), "--sampler-dtype", "float32", checkpoint_dir=root / "ckpt"
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
def callers(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        alice, bob = Caller(stub, ALICE), Caller(stub, BOB)
        yield alice, bob
        alice.unload_all()
        bob.unload_all()


def test_no_identity_can_squat_another_identitys_state_or_export_name(callers):
    alice, bob = callers
    a, b = alice.trained_run(1), bob.trained_run(2)
    at_save, bobs = alice.weights(model_id=a), bob.weights(model_id=b)
    assert not np.allclose(at_save, bobs, atol=1e-4)
    paths = {}
    for method, request in (
        ("SaveState", pb.SaveStateRequest),
        ("SaveWeightsForSampler", pb.SaveWeightsForSamplerRequest),
    ):
        bob(method, request(name="taken", model_id=b))  # the squatter first
        paths[method] = Path(alice(method, request(name="taken", model_id=a)).path)
        assert paths[method].parent.name == "@alice" and paths[method].is_dir()
    alice.step(a, 3)
    for model_path in ("taken", str(paths["SaveWeightsForSampler"])):
        np.testing.assert_allclose(alice.weights(model_path=model_path), at_save, atol=1e-5)
    np.testing.assert_allclose(bob.weights(model_path="taken"), bobs, atol=1e-5)
    alice("LoadState", pb.LoadStateRequest(name=str(paths["SaveState"]), model_id=a))
    np.testing.assert_allclose(alice.weights(model_id=a), at_save, atol=1e-5)
    bob.step(b, 4)
    bob("LoadState", pb.LoadStateRequest(name="taken", model_id=b))
    np.testing.assert_allclose(bob.weights(model_id=b), bobs, atol=1e-5)


def test_samples_of_two_identities_on_the_same_name_each_get_their_own_weights(callers):
    alice, bob = callers
    runs = {caller: caller.trained_run(seed) for caller, seed in ((alice, 5), (bob, 6))}
    expected = {caller: caller.weights(model_id=run) for caller, run in runs.items()}
    for caller, run in runs.items():
        caller("SaveWeightsForSampler", pb.SaveWeightsForSamplerRequest(name="same", model_id=run))
    for _ in range(2):  # together, so that they may share a batch
        futures = {
            caller: caller.stub.Sample.future(
                sample(model_path="same", include_prompt_logprobs=True, typed_outputs=True), metadata=caller.metadata
            )
            for caller in (alice, bob)
        }
        for caller, future in futures.items():
            np.testing.assert_allclose(future.result().prompt_logprobs.float_data, expected[caller], atol=1e-5)


def test_another_identitys_names_answer_exactly_as_missing_ones(callers):
    alice, bob = callers
    a = alice.trained_run(1)
    state = Path(alice("SaveState", pb.SaveStateRequest(name="private", model_id=a)).path)
    export = Path(alice("SaveWeightsForSampler", pb.SaveWeightsForSamplerRequest(name="private", model_id=a)).path)
    b = bob.trained_run(2)
    missing_state, missing_export = (path.parent.with_name("@bob") / "absent" for path in (state, export))
    requests = {
        "LoadState": lambda name: pb.LoadStateRequest(name=name, model_id=b),
        "CreateModel": lambda name: pb.CreateModelRequest(from_state=pb.StateRef(path=name)),
        "Sample": lambda name: sample(model_path=name),
    }
    for method, theirs, missing in (
        ("LoadState", "private", "absent"),
        ("LoadState", state, missing_state),
        ("CreateModel", "private", "absent"),
        ("CreateModel", state, missing_state),
        ("Sample", "private", "absent"),
        ("Sample", export, missing_export),
    ):
        code, details = bob.refusal(method, requests[method](str(theirs)))
        missing_code, missing_details = bob.refusal(method, requests[method](str(missing)))
        assert code == missing_code == grpc.StatusCode.FAILED_PRECONDITION, (method, theirs, details)
        assert details == missing_details.replace("absent", "private"), (method, theirs)
        assert "alice" not in details
    assert [m.model_id for m in bob("ListModels", pb.ListModelsRequest()).models] == [b]  # nothing made


def test_flat_states_and_exports_of_earlier_versions_still_load(callers):
    alice, bob = callers
    a = alice.trained_run(1)
    at_save = alice.weights(model_id=a)
    state = Path(alice("SaveState", pb.SaveStateRequest(name="earlier", model_id=a)).path)
    export = Path(
        alice("SaveWeightsForSampler", pb.SaveWeightsForSamplerRequest(name="earlier", model_id=a, merged=True)).path
    )  # a merged export is loaded from its files
    assert state.parent.name == export.parent.name == "@alice"
    flat_state, flat_export = state.parent.parent / "earlier", export.parent.parent / "earlier"
    os.rename(state, flat_state)  # as earlier versions laid them out: flat, the manifest naming the owner
    os.rename(export, flat_export)
    unowned = flat_state.with_name("earlier-unowned")  # saved without authentication
    shutil.copytree(flat_state, unowned)
    manifest = json.loads((unowned / "manifest.json").read_text())
    assert manifest["owner"] == "alice"
    (unowned / "manifest.json").write_text(json.dumps({**manifest, "owner": None}))

    for path in ("earlier", str(flat_state)):
        c = alice("CreateModel", pb.CreateModelRequest(from_state=pb.StateRef(path=path))).model_id
        np.testing.assert_allclose(alice.weights(model_id=c), at_save, atol=1e-5)
    for model_path in ("earlier", str(flat_export)):
        np.testing.assert_allclose(alice.weights(model_path=model_path), at_save, atol=1e-4)
    for method, request in (
        ("CreateModel", lambda name: pb.CreateModelRequest(from_state=pb.StateRef(path=name))),
        ("Sample", lambda name: sample(model_path=name)),
    ):
        missing_code, missing = bob.refusal(method, request("absent"))
        assert bob.refusal(method, request("earlier")) == (missing_code, missing.replace("absent", "earlier"))
    d = bob("CreateModel", pb.CreateModelRequest(from_state=pb.StateRef(path="earlier-unowned"))).model_id
    np.testing.assert_allclose(bob.weights(model_id=d), at_save, atol=1e-5)
    alice.step(a, 7)  # a save of that name goes to alice's own directory; the flat one stays as it was
    assert Path(alice("SaveState", pb.SaveStateRequest(name="earlier", model_id=a)).path) == state
    assert json.loads((flat_state / "manifest.json").read_text())["step"] == 1


def test_each_identity_has_a_default_run_of_its_own(callers):
    alice, bob = callers
    alice.step("", 0)  # alice's default run, made on first use
    code, details = bob.refusal("OptimStep", pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-2)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "default run of another identity" in details
    assert bob("ListModels", pb.ListModelsRequest()).models == []
    assert bob("GetInfo", pb.GetInfoRequest()).model_id == ""  # the base alone
    code, details = bob.refusal("CreateModel", pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=4)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "another identity" in details and "default" not in details
    alice("UnloadModel", pb.UnloadModelRequest(model_id="default"))
    bob.step("", 1)
    assert [m.model_id for m in bob("ListModels", pb.ListModelsRequest()).models] == ["default"]
    assert bob("GetInfo", pb.GetInfoRequest()).step == 1
    assert alice("ListModels", pb.ListModelsRequest()).models == []


# -- on disk ---------------------------------------------------------------------------------------


def save(root: Path, name: str, step: int, owner: str | None) -> Path:
    return save_state(root, name, {"w": torch.full((2,), float(step))}, {}, step, "tiny", owner=owner)


def test_each_identity_has_a_safe_directory_of_its_own():
    identities = ["alice", "a/b", "a%2Fb", "..", ".", "@x", "+", "é", "a\x00b", "x" * 300, "y" * 300]
    homes = [namespace(identity) for identity in identities]
    assert len(set(homes)) == len(homes)
    assert homes[:4] == ["@alice", "@a%2Fb", "@a%252Fb", "@.."]
    for home in homes:
        assert home.startswith("@") and "/" not in home and "\x00" not in home and len(home.encode()) <= 255


def test_recovery_covers_every_identitys_directory_and_follows_no_link(tmp_path):
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    save(root, "s", 1, "alice")
    home = root / "@alice"
    os.rename(home / "s", home / f".old-s-{'0' * 32}")  # killed between the renames of a save
    (home / f".tmp-t-{'1' * 32}").mkdir()  # killed mid-write
    save(outside, "u", 1, None)
    os.rename(outside / "u", outside / f".tmp-u-{'2' * 32}")
    (root / "@mallory").symlink_to(outside)
    assert sorted(recover(root)) == [
        f"removed leftover @alice/.tmp-t-{'1' * 32}",
        "restored state '@alice/s' from its old copy",
    ]
    assert load_state(root, "s", True, owner="alice").step == 1
    assert os.listdir(outside) == [f".tmp-u-{'2' * 32}"]
    with pytest.raises(StateNotFound, match="not a real directory"):
        save(root, "v", 1, "mallory")
    assert os.listdir(outside) == [f".tmp-u-{'2' * 32}"]


# -- in one process: the engine thread's registry, and the servicer's call for the HTTP door ---------


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Runs in this process, alice's and bob's, each with an export "same" of its own weights (and
    alice's also as "alice-only"); (runs, {identity: (export path, those weights' prompt logprobs)})."""
    root = tmp_path_factory.mktemp("local")
    runs = TrainingRuns(
        load_policy_model(),
        EngineConfig(checkpoint_dir=root / "ckpt", export=ExportConfig(sampler_dir=root / "sampler", dtype="float32")),
    )
    exports = {}
    for seed, identity in enumerate(("alice", "bob")):
        engine = runs.get(runs.create(identity, lora.LoraSpec(rank=4, seed=seed)), identity)
        engine.forward_backward(make_samples([12], seed=seed))
        engine.optim_step(AdamParams(learning_rate=1e-2))
        on_run = runs.sample([(engine.adapter, local_sample(identity), ExpectedVersion())])[0][0]
        exports[identity] = engine.save_weights_for_sampler("same", owner=identity), on_run.prompt_logprobs
    engine.save_weights_for_sampler("alice-only", owner="alice")
    return runs, exports


def local_sample(identity: str, model_path: str = "") -> SampleRequest:
    return SampleRequest(
        torch.tensor(PROMPT.int64_data),
        params=SamplingParams(max_tokens=1, seed=1),
        include_prompt_logprobs=True,
        model_path=model_path,
        owner=identity,
    )


def test_one_batch_of_samples_gives_each_identity_its_own_export_of_a_name(local):
    runs, exports = local
    for order in (("alice", "bob"), ("bob", "alice", "alice", "bob")):
        results = runs.sample(
            [("", runs.validate_sample(local_sample(identity, "same")), ExpectedVersion()) for identity in order]
        )
        for identity, (result, _) in zip(order, results):
            torch.testing.assert_close(result.prompt_logprobs, exports[identity][1], atol=1e-5, rtol=0)


def test_check_export_tells_at_once_whether_the_caller_may_read_an_export(local):
    runs, exports = local
    path = exports["alice"][0]
    operations = Operations(runs, OperationPipeline(), ServiceMetrics(), limits={})

    async def check(identity: str, model_path: str) -> None:
        set_identity(identity)
        await operations.check_export(model_path)

    try:
        for identity, model_path in (("alice", "alice-only"), ("alice", str(path)), ("bob", "same")):
            asyncio.run(check(identity, model_path))
        for theirs, missing in (("alice-only", "absent"), (str(path), str(path.parent.with_name("@bob") / "absent"))):
            with pytest.raises(StateNotFound) as refused:
                asyncio.run(check("bob", theirs))
            with pytest.raises(StateNotFound) as absent:
                asyncio.run(check("bob", missing))
            assert str(refused.value) == str(absent.value).replace("absent", Path(theirs).name)
        with pytest.raises(InvalidInput, match="model_path"):
            asyncio.run(check("alice", "/etc/passwd"))
    finally:
        operations.close()
