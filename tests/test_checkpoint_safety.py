"""Saved states survive a kill at any instant of a save, and refuse symbolic links and unreadable
files with a clean StateNotFound (names per identity: tests/test_namespaces.py)."""

import inspect
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cispo.worker import InvalidInput, StateNotFound
from cispo.worker.checkpoint import load_state, recover, save_state, state_dir


def state_tensors(step):
    """Weights and optimizer moments that differ in every element from one step to the next."""
    weights = {"w": torch.arange(6.0).reshape(2, 3) + step, "b": torch.full((3,), -float(step))}
    optimizer = {"w/exp_avg": torch.full((2, 3), step / 10), "w/step": torch.tensor(float(step))}
    return weights, optimizer


# Runs in a child Python: imports the engine once, then forks one save per line it reads. A
# forked save wraps the filesystem calls a save makes and blocks before the k-th of them, so the
# test can kill it there with SIGKILL.
ZYGOTE = r"""
import os, shutil, sys, time, traceback
from pathlib import Path
from cispo.worker import checkpoint

WRAPPED = [(os, "mkdir"), (os, "open"), (os, "close"), (os, "fsync"), (os, "rename"), (os, "replace"),
           (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]
old, new = state_tensors(1), state_tensors(2)


def block_before_call(k):
    calls = []
    def wrap(fn):
        def wrapper(*args, **kwargs):
            if len(calls) == k:
                print(f"paused {os.getpid()} {fn.__name__}", flush=True)
                time.sleep(1000)
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper
    for module, attr in WRAPPED:
        setattr(module, attr, wrap(getattr(module, attr)))
    return calls


for line in sys.stdin:
    mode, k, root = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            if mode in ("overwrite", "remove"):
                checkpoint.save_state(Path(root), "s", *old, 1, "tiny")
            calls = block_before_call(int(k))
            if mode == "remove":
                checkpoint.remove_directory(Path(root), "s", checkpoint.FORMAT)
            else:
                checkpoint.save_state(Path(root), "s", *new, 2, "tiny")
            print("done " + " ".join(calls), flush=True)
        except BaseException:
            print("failed " + traceback.format_exc().replace("\n", " | "), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(f"reaped {status}", flush=True)
"""


class Zygote:
    def __init__(self):
        script = "import torch\n" + inspect.getsource(state_tensors) + ZYGOTE
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("exited")

    def save(self, mode: str, block_at: int, root: Path) -> str:
        """Fork a save ("first" into an empty directory, or "overwrite" of step 1 by step 2), or
        the removal of a saved step 1 ("remove"), that blocks before its `block_at`-th filesystem call, and SIGKILL it there. Returns the
        child's report: "paused <pid> <call>" or "done <calls...>"."""
        self.proc.stdin.write(f"{mode} {block_at} {root}\n")
        self.proc.stdin.flush()
        report = self.lines.get(timeout=60)
        assert report.startswith(("paused", "done")), report
        if report.startswith("paused"):
            os.kill(int(report.split()[1]), signal.SIGKILL)
        reaped = self.lines.get(timeout=60)
        assert reaped == (f"reaped {signal.SIGKILL}" if report.startswith("paused") else "reaped 0"), (report, reaped)
        return report

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def loaded_step(root: Path) -> int | None:
    """The step of state "s" (checking that every tensor is exactly that step's), or None."""
    try:
        state = load_state(root, "s", with_optimizer=True)
    except StateNotFound as e:
        assert "no saved state named 's'" in str(e)  # noqa: PT017  # either outcome is possible: a missing state is named
        return None
    assert state.step in (1, 2)
    weights, optimizer = state_tensors(state.step)
    for loaded, expected in ((state.weights, weights), (state.optimizer, optimizer)):
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    return state.step


def hidden(root: Path) -> list[str]:
    return sorted(e for e in os.listdir(root) if e.startswith(".")) if root.exists() else []


def complete_save_calls(zygote, tmp_path, mode):
    report = zygote.save(mode, 10**9, tmp_path / f"{mode}-unpaused")
    assert report.startswith("done "), report
    return report.split()[1:]


def test_a_kill_at_any_call_of_an_overwriting_save_leaves_the_old_or_the_new_state(zygote, tmp_path):
    calls = complete_save_calls(zygote, tmp_path, "overwrite")
    assert {"fsync", "rename", "rmtree"} <= set(calls)
    outcomes = []
    for k, call in enumerate(calls):
        root = tmp_path / f"overwrite-{k}"
        report = zygote.save("overwrite", k, root)
        assert report.startswith("paused") and report.endswith(call), (k, report)
        before = loaded_step(root)  # before recover: old, new, or cleanly not found
        recover(root)
        after = loaded_step(root)
        assert after in (1, 2), (k, call)
        assert before in (None, after), (k, call)
        assert hidden(root) == [], (k, call)
        outcomes.append(after)
    # The old state until the swap, the new one from then on.
    assert outcomes == sorted(outcomes) and outcomes[0] == 1 and outcomes[-1] == 2, list(zip(calls, outcomes))


def test_a_kill_at_any_call_of_a_first_save_leaves_nothing_or_the_new_state(zygote, tmp_path):
    calls = complete_save_calls(zygote, tmp_path, "first")
    outcomes = []
    for k, call in enumerate(calls):
        root = tmp_path / f"first-{k}"
        assert zygote.save("first", k, root).startswith("paused")
        before = loaded_step(root)
        recover(root)
        after = loaded_step(root)
        assert before in (None, after) and after in (None, 2), (k, call)
        assert hidden(root) == [], (k, call)
        outcomes.append(after or 0)
    assert outcomes == sorted(outcomes) and outcomes[0] == 0 and outcomes[-1] == 2, list(zip(calls, outcomes))


def test_a_kill_at_any_call_of_a_removal_leaves_the_whole_state_or_nothing(zygote, tmp_path):
    """Never half a state: a removal killed inside its rmtree leaves a copy without its
    manifest, which recover removes rather than restores."""
    calls = complete_save_calls(zygote, tmp_path, "remove")
    assert {"rename", "unlink", "rmtree"} <= set(calls)
    outcomes = []
    for k, call in enumerate(calls):
        root = tmp_path / f"remove-{k}"
        assert zygote.save("remove", k, root).startswith("paused")
        before = loaded_step(root)
        recover(root)
        after = loaded_step(root)  # loads every tensor of step 1 exactly, or finds no state
        assert before in (None, after) and after in (None, 1), (k, call)
        assert hidden(root) == [] and os.listdir(root) == ([] if after is None else ["s"]), (k, call)
        outcomes.append(after or 0)
    # The whole state (under its name, or put back by recover) until its manifest goes, nothing from then on.
    assert outcomes == sorted(outcomes, reverse=True) and outcomes[0] == 1 and outcomes[-1] == 0, list(
        zip(calls, outcomes)
    )


def save(root, name, step, owner=None):
    return save_state(root, name, *state_tensors(step), step, "tiny", owner=owner)


def hidden_copy(root: Path, kind: str, name: str) -> Path:
    return root / f".{kind}-{name}-{os.urandom(16).hex()}"


def test_recover_restores_missing_names_and_removes_every_other_leftover(tmp_path):
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    save(root, "kept", 1)
    save(outside, "linked", 1)
    shutil.copytree(root / "kept", hidden_copy(root, "old", "kept"))  # stale: "kept" exists
    incomplete = hidden_copy(root, "tmp", "kept")  # killed mid-write
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes((root / "kept" / "model.safetensors").read_bytes()[:20])
    save(root, "swapped", 1)  # killed between renames
    os.rename(root / "swapped", hidden_copy(root, "old", "swapped"))
    save(root, "new", 2)
    os.rename(root / "new", hidden_copy(root, "tmp", "swapped"))
    save(root, "restorable", 1)  # only an old copy left
    os.rename(root / "restorable", hidden_copy(root, "old", "restorable"))
    hidden_copy(root, "tmp", "linked").symlink_to(outside / "linked")  # planted link
    (root / ".keep").write_text("not ours")

    lines = recover(root)

    assert "restored state 'swapped' from its new copy" in lines
    assert "restored state 'restorable' from its old copy" in lines
    assert sum(line.startswith("removed leftover .") for line in lines) == 4, lines
    assert sorted(os.listdir(root)) == [".keep", "kept", "restorable", "swapped"]
    assert load_state(root, "swapped", True).step == 2 and load_state(root, "restorable", True).step == 1
    assert load_state(outside, "linked", True).step == 1
    assert recover(root) == []


def test_recover_is_safe_without_a_directory(tmp_path):
    assert recover(tmp_path / "missing") == []
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("name", ["a-" + "0" * 32, "x" * 128, "-.-", "b-tmp-c"])
def test_hidden_names_parse_back_to_any_valid_name(tmp_path, name):
    save(tmp_path, name, 1)
    os.rename(tmp_path / name, hidden_copy(tmp_path, "old", name))
    assert recover(tmp_path) == [f"restored state '{name}' from its old copy"]
    assert load_state(tmp_path, name, True).step == 1


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_state_that_is_a_symbolic_link_is_refused_for_load_and_save(tmp_path):
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    save(outside, "foo", 1)
    root.mkdir()
    (root / "foo").symlink_to(outside / "foo")
    (root / "etc").symlink_to("/etc")
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    before = snapshot(outside)
    for name in ("foo", "etc", "dangling"):
        with pytest.raises(StateNotFound, match=f"^state '{name}' is a symbolic link; refusing to follow it$"):
            load_state(root, name, True)
    with pytest.raises(StateNotFound, match="^state 'foo' is a symbolic link; refusing to replace it$"):
        save(root, "foo", 2)
    assert (root / "foo").is_symlink() and os.readlink(root / "foo") == str(outside / "foo")
    assert snapshot(outside) == before and hidden(root) == []


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "manifest.json"])
def test_a_file_that_is_a_symbolic_link_is_refused(tmp_path, file):
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    save(root, "foo", 1)
    save(outside, "other", 2)
    (root / "foo" / file).unlink()
    (root / "foo" / file).symlink_to(outside / "other" / file)
    before = snapshot(outside)
    with pytest.raises(StateNotFound, match=f"^state 'foo' has a symbolic link {file}; refusing to follow it$"):
        load_state(root, "foo", with_optimizer=True)
    assert snapshot(outside) == before


def write_json(path, value):
    path.write_text(json.dumps(value))


CORRUPTIONS = {
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-9]),
        "model.safetensors: Error while deserializing header",
    ),
    "empty optimizer": (lambda d: (d / "optimizer.safetensors").write_bytes(b""), "optimizer.safetensors: "),
    "invalid JSON manifest": (
        lambda d: (d / "manifest.json").write_text('{"format": "cispo.st'),
        "manifest.json: Unterminated string",
    ),
    "manifest not an object": (lambda d: write_json(d / "manifest.json", [1, 2]), "manifest.json is not a JSON object"),
    "wrong format": (
        lambda d: write_json(d / "manifest.json", {"format": "other" * 50, "step": 1}),
        "manifest.json has format 'otherother",
    ),
    "missing step": (
        lambda d: write_json(d / "manifest.json", {"format": "cispo.state.v1"}),
        "manifest.json has no valid step",
    ),
    "bad owner": (
        lambda d: write_json(d / "manifest.json", {"format": "cispo.state.v1", "step": 1, "owner": 7}),
        "manifest.json has an invalid owner",
    ),
    "missing manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json: No such file or directory"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: No such file or directory"),
    "directory for a file": (
        lambda d: ((d / "optimizer.safetensors").unlink(), (d / "optimizer.safetensors").mkdir()),
        "optimizer.safetensors is not a regular file",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_an_unreadable_state_is_a_clean_state_not_found(tmp_path, case):
    corrupt, reason = CORRUPTIONS[case]
    save(tmp_path, "x", 1)
    corrupt(tmp_path / "x")
    with pytest.raises(StateNotFound) as err:
        load_state(tmp_path, "x", with_optimizer=True)
    assert str(err.value).startswith(f"state 'x' cannot be read: {reason}"), str(err.value)
    assert len(str(err.value)) < 200 and str(tmp_path) not in str(err.value)


def test_a_state_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "x").write_text("not a state")
    with pytest.raises(StateNotFound, match="^state 'x' is not a directory; refusing to load it$"):
        load_state(tmp_path, "x", False)
    with pytest.raises(StateNotFound, match="^state 'x' is not a directory; refusing to replace it$"):
        save(tmp_path, "x", 1)
    assert (tmp_path / "x").read_text() == "not a state"


@pytest.mark.parametrize("name", ["x" * 5000, "é" * 3000, b"x" * 5000, None, ".hidden", "a/b", "x" * 129])
def test_bad_names_get_a_short_invalid_input(tmp_path, name):
    for call in (
        lambda: state_dir(tmp_path, name),
        lambda: load_state(tmp_path, name, False),
        lambda: save(tmp_path, name, 1),
    ):
        with pytest.raises(InvalidInput) as err:
            call()
        assert [v.field for v in err.value.violations] == ["name"]
        assert len(str(err.value)) < 300 and "is not a valid state name" in str(err.value)
    if isinstance(name, str) and len(name) > 64:
        assert f"… ({len(name)} chars)" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_removing_a_directory_removes_only_the_callers_own_and_leaves_nothing_half_removed(tmp_path):
    from cispo.worker.checkpoint import FORMAT, remove_directory

    save(tmp_path, "s", 1, owner="alice")
    os.rename(save(tmp_path, "flat", 1, owner="alice"), tmp_path / "flat")  # as earlier versions laid it out
    before = snapshot(tmp_path)
    for owner, name in (("bob", "s"), ("alice", "absent"), ("alice", "flat")):
        with pytest.raises(StateNotFound, match=f"^no saved state named '{name}' in the checkpoint directory$"):
            remove_directory(tmp_path, name, FORMAT, owner=owner)
    assert snapshot(tmp_path) == before
    remove_directory(tmp_path, "s", FORMAT, owner="alice")
    assert sorted(os.listdir(tmp_path)) == ["@alice", "flat"] and os.listdir(tmp_path / "@alice") == []
    with pytest.raises(StateNotFound):
        load_state(tmp_path, "s", True, owner="alice")
