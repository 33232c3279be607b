"""The official tinker SDK's RestClient (0.38), unmodified, on a live server's --http-port: a run's
checkpoints saved with a lifetime and metadata are listed, inspected, downloaded as a tar equal
to the directory on disk, and deleted; the caller's runs are its training runs; another identity
gets 404 for all of it, and an archive URL is good only as signed."""

import io
import tarfile
import urllib.error
import urllib.request

import pytest
import requests
import tinker
from server_process import ServerProcess
from tinker import types
from tinker_sdk_loop import CONFIG, batch

pytestmark = pytest.mark.timeout(300)
ALICE, BOB = "alice-rest-0123456789ab", "bob-rest-9876543210abcd"
TTL = 7200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    checkpoint_dir, sampler_dir = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("sampler")
    proc = ServerProcess(
        "--http-port",
        "0",
        "--auth-tokens-file",
        str(tokens),
        "--sampler-dtype",
        "float32",
        "--sampler-dir",
        str(sampler_dir),
        checkpoint_dir=checkpoint_dir,
    )
    proc.checkpoint_dir, proc.sampler_dir = checkpoint_dir, sampler_dir
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
def base(server, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    return f"http://127.0.0.1:{server.http_port}"


def tar_files(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_checkpoints_are_listed_inspected_downloaded_and_deleted(server, base):
    alice = tinker.RestClient(base_url=base, api_key=f"tml-{ALICE}")
    bob = tinker.RestClient(base_url=base, api_key=f"tml-{BOB}")
    with tinker.ServiceClient(user_metadata={"team": "rl"}, base_url=base, api_key=f"tml-{ALICE}") as service:
        training = service.create_lora_training_client(base_model="", rank=4, seed=1).result()
        training.forward_backward(batch(1), "cispo", CONFIG).result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        state = training.save_state("kept", ttl_seconds=TTL, user_metadata={"note": "first"}).result().path
        export = training.save_weights_for_sampler("export").result().path
        run_id = state.split("/")[2]

        checkpoints = {c.tinker_path: c for c in alice.list_checkpoints(run_id).result().checkpoints}
        assert set(checkpoints) == {state, export}
        kept, exported = checkpoints[state], checkpoints[export]
        directory = server.checkpoint_dir / "@alice" / f"{run_id}.kept"
        assert (kept.checkpoint_id, kept.checkpoint_type) == ("weights/kept", "training")
        assert kept.user_metadata == {"note": "first"}
        assert kept.size_bytes == sum(p.stat().st_size for p in directory.iterdir())
        assert abs((kept.expires_at - kept.time).total_seconds() - TTL) < 600
        assert (exported.checkpoint_id, exported.checkpoint_type, exported.expires_at) == (
            "sampler_weights/export",
            "sampler",
            None,
        )
        assert {state, export} <= {c.tinker_path for c in alice.list_user_checkpoints().result().checkpoints}

        info = alice.get_weights_info_by_tinker_path(state).result()
        assert info.is_lora and info.lora_rank == 4
        run = alice.get_training_run_by_tinker_path(state).result()
        assert (run.training_run_id, run.is_lora, run.lora_rank) == (run_id, True, 4)
        assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == export
        assert run.user_metadata == {"team": "rl"}
        assert run_id in [r.training_run_id for r in alice.list_training_runs().result().training_runs]

        # The archive: a 302 to a signed URL that needs no key, of a tar equal to the directory.
        route = f"{base}/api/v1/training_runs/{run_id}/checkpoints/weights/kept/archive"
        answer = requests.get(route, headers={"X-API-Key": f"tml-{ALICE}"}, allow_redirects=False)
        assert answer.status_code == 302, answer.text
        url = answer.headers["Location"]
        with urllib.request.urlopen(url) as download:
            assert int(download.headers["Content-Length"]) > kept.size_bytes
            assert tar_files(download.read()) == {p.name: p.read_bytes() for p in directory.iterdir()}
        exports = server.sampler_dir / "@alice" / f"{run_id}.export"
        answer = requests.get(
            route.replace("weights/kept", "sampler_weights/export"), headers={"X-API-Key": f"tml-{ALICE}"}
        )  # followed, with the key: the tar itself
        assert tar_files(answer.content) == {p.name: p.read_bytes() for p in exports.iterdir()}
        token = url.rsplit("/", 1)[1]  # its signed part first: another first character is another grant
        altered = url.replace(token, ("B" if token[0] != "B" else "C") + token[1:])
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(altered)
        assert refused.value.code == 403

        # Another identity: everything of alice's is missing.
        with pytest.raises(tinker.NotFoundError):
            bob.list_checkpoints(run_id).result()
        with pytest.raises(tinker.NotFoundError):
            bob.get_training_run(run_id).result()
        with pytest.raises(tinker.NotFoundError):
            bob.get_weights_info_by_tinker_path(state).result()
        with pytest.raises(tinker.NotFoundError):
            bob.delete_checkpoint_from_tinker_path(state).result()
        assert requests.get(route, headers={"X-API-Key": f"tml-{BOB}"}, allow_redirects=False).status_code == 404
        assert run_id not in [r.training_run_id for r in bob.list_training_runs().result().training_runs]
        assert bob.list_user_checkpoints().result().checkpoints == []
        assert directory.exists()

        alice.delete_checkpoint_from_tinker_path(state).result()
        assert [c.tinker_path for c in alice.list_checkpoints(run_id).result().checkpoints] == [export]
        assert not directory.exists()
        with pytest.raises(tinker.NotFoundError):
            alice.delete_checkpoint_from_tinker_path(state).result()
        with pytest.raises(urllib.error.HTTPError) as gone:
            urllib.request.urlopen(url)  # signed before the deletion
        assert gone.value.code == 404
        assert training.save_state("kept").result().path == state  # a new checkpoint under the old name
        with pytest.raises(urllib.error.HTTPError) as replaced:
            urllib.request.urlopen(url)  # signed for the deleted one, not for this one
        assert replaced.value.code == 404


def test_bad_checkpoint_routes_answer_json_errors(server, base):
    key = {"X-API-Key": f"tml-{ALICE}"}
    api = f"{base}/api/v1"
    assert requests.get(f"{api}/training_runs/run-000000000000/checkpoints", headers=key).status_code == 404
    wrong_kind = requests.delete(f"{api}/training_runs/run-000000000000/checkpoints/other/x", headers=key)
    assert wrong_kind.status_code == 404 and "error" in wrong_kind.json()
    not_delete = requests.get(f"{api}/training_runs/run-000000000000/checkpoints/weights/x", headers=key)
    assert not_delete.status_code == 405
    bad_path = requests.post(f"{api}/weights_info", json={"tinker_path": "tinker://a/b"}, headers=key)
    assert bad_path.status_code == 400 and bad_path.json()["field_violations"][0]["field"] == "tinker_path"
    bad_page = requests.get(f"{api}/training_runs", params={"limit": "-1"}, headers=key)
    assert bad_page.status_code == 400
    for metadata in ({"k": "\ud800"}, {f"k{i}": "v" for i in range(33)}):  # a lone surrogate; too many entries
        session = {"tags": [], "user_metadata": metadata, "sdk_version": "0.38.0"}
        refused = requests.post(f"{api}/create_session", json=session, headers=key)
        assert refused.status_code == 400 and refused.json()["field_violations"][0]["field"] == "user_metadata"
    assert requests.get(f"{api}/checkpoint_archives/nonsense").status_code == 403
    assert requests.get(f"{api}/training_runs", headers={"X-API-Key": "tml-nobody-at-all-1234"}).status_code == 401
    publish = requests.post(f"{api}/training_runs/run-000000000000/checkpoints/weights/x/publish", headers=key)
    assert publish.status_code == 404  # not offered: unknown, as before
    assert requests.delete(f"{api}/training_runs", headers=key).status_code == 404  # DELETE: that one route only
