"""Saved training states: weights and optimizer moments in safetensors plus a JSON manifest.

    <home>/<name>/model.safetensors      parameters by name (fp32)
    <home>/<name>/optimizer.safetensors  AdamW moments "<param>/<exp_avg|exp_avg_sq|step>"
    <home>/<name>/manifest.json          format, step, model name, parameter count, owner (the
                                         identity that saved it), a LoRA run's LoRA options, the
                                         time it was saved ("created") and what `labelled` adds
                                         (its lifetime and user metadata, worker.checkpoints)

Names are per identity. `<home>` is the checkpoint directory itself without authentication
(identity None), else the identity's own directory `<checkpoint_dir>/@<identity>` (`namespace`):
an identity saves, loads and removes only there, so no identity can take or probe another's
names. For compatibility an identity also reads a name from the flat layout of earlier versions,
`<checkpoint_dir>/<name>`, when it has none of its own of that name and the state's manifest
names it as the owner, or no owner (saved without authentication, readable by anyone then and
now). Anything else answers exactly as a missing name does.

Crash safety. The server is the only process that uses the directory, and it saves one state at
a time. A save writes a hidden copy `.tmp-<name>-<32 hex>` in the name's home and fsyncs both
tensor files before it writes and fsyncs the manifest, so a copy with a readable manifest is
complete. It then swaps the copy in:

    rename <name> -> .old-<name>-<32 hex>      (only when the name exists)
    rename .tmp-<name>-<32 hex> -> <name>
    fsync the home, remove .old-<name>-<32 hex>

Invariant: at every instant the name is recoverable as the old state or the new one: either
`<name>` is the old or new state, or it is missing while a complete `.old-` (old) and a complete
`.tmp-` (new) copy of it exist. A crash therefore leaves at most hidden copies behind; `recover`,
run at server start before any save, renames a missing name back from its complete new copy
(else from its old one) and removes every other hidden copy, in every home. Until it runs, a
missing name is simply not found. Hidden names end in "-" and a fixed-length hex uuid, so they
parse back to the state name without ambiguity, and at most 166 characters they fit any file
system's name limit.

Trust. Names are plain file names and never reach outside their home. Symbolic links, as a
home, a state or a file in one, are refused and never followed. These v1 states are whole (not
sharded); sharded groups write v2 states (worker.sharded_checkpoint). A group of any size loads
either, whatever size saved it.

Sampler weights (worker.sampler_weights) are saved directories of the same protocol, with their
own manifest format, in their own root directory.
"""

import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cispo.worker.errors import FieldViolation, InvalidInput, StateNotFound

FORMAT = "cispo.state.v1"
SHARDED_FORMAT = "cispo.state.v2"  # worker.sharded_checkpoint
STATE_FORMATS = (FORMAT, SHARDED_FORMAT)
SAMPLER_FORMAT = "cispo.sampler_weights.v1"  # worker.sampler_weights
FORMATS = (*STATE_FORMATS, SAMPLER_FORMAT)
MAX_NAME_LENGTH = 128
NAME_PATTERN = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
NAMESPACE_PREFIX = "@"  # never the first character of a name
MAX_NAMESPACE_CHARS = 200  # longer encodings are hashed (file names may have 255 bytes)
HIDDEN_PATTERN = re.compile(r"\.(tmp|old)-(.+)-[0-9a-f]{32}")
MODEL_FILE, OPTIMIZER_FILE, MANIFEST_FILE = "model.safetensors", "optimizer.safetensors", "manifest.json"
SHOWN_CHARS = 64
MAX_PATH_CHARS = 4096  # Linux's PATH_MAX
# Manifest fields of the saves made within `labelled` (on this thread); None outside one.
_LABEL: ContextVar[dict | None] = ContextVar("cispo_checkpoint_label", default=None)


@dataclass(frozen=True)
class LoadedState:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    step: int
    manifest: dict


def state_dir(root: Path, name: str, field: str = "name") -> Path:
    """`root/name`, after checking that `name` is a plain, safe file name (`check_name`)."""
    return root / check_name(name, field)


def namespace(identity: str) -> str:
    """The directory name of `identity`'s home: '@' and the identity percent-encoded (letters,
    digits and '_.-~' stay as they are), or '@+' and its SHA-256 where that would be long. Two
    identities never share one, and no name is one (names never start with '@')."""
    encoded = quote(identity, safe="")
    if len(encoded) < MAX_NAMESPACE_CHARS:
        return NAMESPACE_PREFIX + encoded
    return f"{NAMESPACE_PREFIX}+{hashlib.sha256(identity.encode()).hexdigest()}"


def home(root: Path, owner: str | None) -> Path:
    """Where `owner`'s names live: `root` itself for no identity, else `root/<namespace>`."""
    return root if owner is None else root / namespace(owner)


def _real_home(root: Path, owner: str | None) -> Path:
    """`home`, checked to be a real directory if it exists (a link is never followed)."""
    path = home(root, owner)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise StateNotFound(f"the directory of your names cannot be read: {e.strerror}") from e
    if owner is not None and not stat.S_ISDIR(mode):
        raise StateNotFound("the directory of your names is not a real directory; refusing to use it")
    return path


def check_name(name: str, field: str = "name") -> str:
    """`name`, if it is a plain, safe file name: 1-128 letters, digits, '.', '_' or '-', not
    starting with '.' (so never empty, '.', '..', a path, or with an unprintable character).
    Otherwise InvalidInput naming `field` and what is wrong. Every name a client gives goes
    through here before it reaches the file system."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        return name
    raise InvalidInput(
        [
            FieldViolation(
                field,
                f"{shown(name)} is not a valid state name: {_name_problem(name)}; use "
                "1-128 letters, digits, '.', '_' or '-', not starting with '.'",
            )
        ]
    )


def _name_problem(name: object) -> str:
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > 128:
        return f"it is {len(name)} characters long"
    if (control := _unprintable(name)) is not None:
        return f"it contains the unprintable character {control!r}"
    if name in (".", ".."):
        return "it names a directory itself or its parent"
    if "/" in name or "\\" in name:
        return "it is a path, not a name"
    if name.startswith("."):
        return "it starts with '.'"
    return f"it contains {next(c for c in name if not NAME_PATTERN.fullmatch('a' + c))!r}"


def name_in(root: Path, name_or_path: str, field: str, what: str) -> str:
    """The name of the saved directory (a `what`) that a request gives by name, or by its path
    as its save answered: in `root` or in a home in it (`check_home` says whose may be read).
    Unprintable characters (NUL, other controls) are refused before any file system call;
    InvalidInput naming `field` for anything else that names no such directory."""

    def refuse(problem: str) -> NoReturn:
        raise InvalidInput([FieldViolation(field, f"{shown(name_or_path)} {problem}")])

    if not isinstance(name_or_path, str) or "/" not in name_or_path:
        return check_name(name_or_path, field)
    if len(name_or_path) > MAX_PATH_CHARS:
        refuse(f"is not a {what} of this server: it is {len(name_or_path)} characters long")
    if (control := _unprintable(name_or_path)) is not None:
        refuse(f"contains the unprintable character {control!r}")
    path = Path(name_or_path)
    parent, top = path.parent.resolve(), root.resolve()
    if parent != top and not (parent.parent == top and parent.name.startswith(NAMESPACE_PREFIX)):
        refuse(f"is not a {what} of this server (its {what}s are in {root}); give a path its save answered, or a name")
    return check_name(path.name, field)


def check_home(root: Path, name_or_path: str, owner: str | None, format: str | tuple[str, ...]) -> None:
    """A name, or a path (checked by `name_in`) in `root` or in `owner`'s home, passes; a path
    in another identity's home is answered as a missing name is, whether it exists or not."""
    path = Path(name_or_path)
    if "/" in name_or_path and path.parent.resolve() not in (root.resolve(), home(root, owner).resolve()):
        raise _missing(path.name, format)


def _unprintable(text: str) -> str | None:
    """The first character of `text` that is not printable (NUL, other controls, line separators)."""
    return None if text.isprintable() else next(c for c in text if not c.isprintable())


def save_state(
    root: Path,
    name: str,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    step: int,
    model_name: str,
    owner: str | None = None,
    lora: dict | None = None,
) -> Path:
    """Write the state crash-safely as `owner`'s `name` (see the module docstring), replacing
    the one of that name in its home."""

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / MODEL_FILE)
        save_file(optimizer, tmp / OPTIMIZER_FILE)

    return save_directory(
        root,
        name,
        write,
        {"format": FORMAT, "step": step, "model_name": model_name, "num_tensors": len(weights), "lora": lora},
        owner,
    )


@contextmanager
def labelled(fields: dict) -> Iterator[None]:
    """Every directory `save_directory` writes in this block, on this thread, has `fields` in
    its manifest too, written with it (so a crash never separates them). The service labels a
    save this way without every layer between it and the files (engines, groups) passing them."""
    token = _LABEL.set(fields)
    try:
        yield
    finally:
        _LABEL.reset(token)


def save_directory(
    root: Path, name: str, write: Callable[[Path], None], manifest: dict, owner: str | None = None
) -> Path:
    """`write(tmp)` the files of `owner`'s `name` into a hidden copy in its home, then fsync
    them, write the manifest (plus `owner`, the time and any `labelled` fields) last and swap
    the copy in (see the module docstring). Returns the directory, `<home>/name`."""
    directory = _real_home(root, owner)
    target = directory / check_name(name)
    replacing = _is_state(target, name, replacing=True)
    root.mkdir(parents=True, exist_ok=True)
    if not directory.exists():
        directory.mkdir()
        _fsync(root)
    tmp = directory / f".tmp-{name}-{uuid.uuid4().hex}"
    os.mkdir(tmp)
    try:
        write(tmp)
        for file in sorted(tmp.iterdir()):
            _fsync(file)
        with open(tmp / MANIFEST_FILE, "x") as f:
            json.dump({**manifest, "created": time.time(), **(_LABEL.get() or {}), "owner": owner}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replacing:
        old = directory / f".old-{name}-{uuid.uuid4().hex}"
        os.rename(target, old)
        os.rename(tmp, target)
        _fsync(directory)
        shutil.rmtree(old, ignore_errors=True)  # what remains is removed by `recover`
    else:
        os.rename(tmp, target)
        _fsync(directory)
    return target


def load_state(root: Path, name: str, with_optimizer: bool, owner: str | None = None) -> LoadedState:
    """Read `owner`'s whole v1 state `name` into memory (nothing is applied here)."""
    path, manifest = open_directory(root, name, FORMAT, owner)
    return read_state(path, manifest, name, with_optimizer)


def read_state(path: Path, manifest: dict, name: str, with_optimizer: bool) -> LoadedState:
    """The whole v1 state at `path` (as `open_directory` gave it), in memory."""
    weights = _read_tensors(path, MODEL_FILE, name)
    optimizer = _read_tensors(path, OPTIMIZER_FILE, name) if with_optimizer else {}
    return LoadedState(weights=weights, optimizer=optimizer, step=manifest["step"], manifest=manifest)


def open_directory(root: Path, name: str, format: str | tuple[str, ...], owner: str | None = None) -> tuple[Path, dict]:
    """(the directory, its manifest) of the saved directory `name` of `format` (or one of
    several) that `owner` reads (see the module docstring); StateNotFound otherwise."""
    path = _locate(root, check_name(name), format, owner)
    return path, _opened(path, name, format)


def _locate(root: Path, name: str, format: str | tuple[str, ...], owner: str | None) -> Path:
    """`owner`'s directory `name`, else (an identity) a flat one of earlier versions that it or
    no one owns; else StateNotFound, as for a name no one has."""
    own = _real_home(root, owner) / name
    if _is_state(own, name, replacing=False):
        return own
    if owner is not None and _legacy_readable(root / name, name, owner):
        return root / name
    raise _missing(name, format)


def _legacy_readable(path: Path, name: str, owner: str) -> bool:
    """Whether the flat directory `path` of earlier versions is there and `owner`'s or no one's.
    Whose a link, a file or an unreadable manifest is cannot be told: not readable."""
    try:
        return _is_state(path, name, replacing=False) and _read_manifest(path, name).get("owner") in (None, owner)
    except StateNotFound:
        return False


def _missing(name: str, format: str | tuple[str, ...]) -> StateNotFound:
    """The one answer for a name the caller has no directory of, whoever else may have one."""
    state = format != SAMPLER_FORMAT
    return StateNotFound(
        f"no saved {'state' if state else 'weights'} named '{name}' in "
        f"the {'checkpoint' if state else 'sampler'} directory"
    )


def _opened(path: Path, name: str, format: str | tuple[str, ...]) -> dict:
    """The manifest of the saved directory at `path`, of `format`, holding regular files only."""
    manifest = _read_manifest(path, name, format)
    for entry in os.listdir(path):
        _regular_file(path, entry, name)  # no links, no subdirectories
    return manifest


def remove_directory(root: Path, name: str, format: str | tuple[str, ...], owner: str | None = None) -> None:
    """Delete `owner`'s saved directory `name` of `format` from its home (StateNotFound if it has
    none there; flat ones of earlier versions stay): renamed to a hidden copy first, whose
    manifest then goes before its other files, so a crash leaves the name gone and at most an
    incomplete copy, which `recover` removes; never half a directory under its name."""
    directory = _real_home(root, owner)
    path = directory / check_name(name)
    if not _is_state(path, name, replacing=False):
        raise _missing(name, format)
    _opened(path, name, format)
    old = directory / f".old-{name}-{uuid.uuid4().hex}"
    os.rename(path, old)
    _fsync(directory)
    os.unlink(old / MANIFEST_FILE)  # from here on the copy is incomplete: never restored
    _fsync(old)
    shutil.rmtree(old, ignore_errors=True)


def saved_in(root: Path, owner: str | None, format: str | tuple[str, ...]) -> list[tuple[str, Path, dict]]:
    """(name, directory, manifest) of every readable saved directory of `format` in `owner`'s
    home, by name (hidden copies, homes, links and unreadable ones left out)."""
    directory = _real_home(root, owner)
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if NAME_PATTERN.fullmatch(entry):
            try:
                if _is_state(directory / entry, entry, replacing=False):
                    found.append((entry, directory / entry, _opened(directory / entry, entry, format)))
            except StateNotFound:
                continue
    return found


def saved_everywhere(root: Path, format: str | tuple[str, ...]) -> Iterator[tuple[str | None, str, dict]]:
    """(owner, name, manifest) of every saved directory of `format` in `root` and in every
    identity's home in it, each in the home of the owner its manifest names (flat ones of
    earlier versions, owned by an identity, are left out)."""
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    homes = [root] + [
        root / e for e in entries if e.startswith(NAMESPACE_PREFIX) and stat.S_ISDIR(os.lstat(root / e).st_mode)
    ]
    for directory in homes:
        for name, path, manifest in saved_in(directory, None, format):
            owner = manifest["owner"]
            if path.parent == home(root, owner):
                yield owner, name, manifest


def directory_bytes(path: Path) -> int:
    """Bytes of the files in a saved directory (its entries, not followed)."""
    try:
        return sum(os.lstat(path / entry).st_size for entry in os.listdir(path))
    except FileNotFoundError:
        return 0


def recover(root: Path) -> list[str]:
    """Finish what crashed saves left behind (see the module docstring), in `root` and in every
    identity's home in it: restore each missing name from its complete new copy, else its old
    one, then remove every other hidden copy. Run at server start, before any save. Returns one
    line per action."""
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    done = _recover_home(root, entries, "")
    for entry in entries:  # the homes: real directories only, a link is never followed
        if entry.startswith(NAMESPACE_PREFIX) and stat.S_ISDIR(os.lstat(root / entry).st_mode):
            done += _recover_home(root / entry, sorted(os.listdir(root / entry)), f"{entry}/")
    return done


def _recover_home(root: Path, entries: list[str], shown_as: str) -> list[str]:
    """`recover` in one home, whose `entries` are listed; names in the lines start `shown_as`."""
    copies: dict[str, list[str]] = {}
    for entry in entries:
        match = HIDDEN_PATTERN.fullmatch(entry)
        if match and NAME_PATTERN.fullmatch(match[2]):
            copies.setdefault(match[2], []).append(entry)
    done = []
    for name, hidden in copies.items():
        complete = [c for c in hidden if _is_complete(root / c)]
        if complete and not os.path.lexists(root / name):
            best = max(complete, key=lambda c: (c.startswith(".tmp-"), os.stat(root / c / MANIFEST_FILE).st_mtime_ns))
            os.rename(root / best, root / name)
            _fsync(root)
            hidden.remove(best)
            done.append(
                f"restored state '{shown_as}{name}' from its {'new' if best.startswith('.tmp-') else 'old'} copy"
            )
        for c in hidden:
            if os.path.islink(root / c) or not os.path.isdir(root / c):
                os.unlink(root / c)
            else:
                shutil.rmtree(root / c)
            done.append(f"removed leftover {shown_as}{c}")
    return done


def _is_state(path: Path, name: str, replacing: bool) -> bool:
    """Whether the state exists, as a real directory; a link or anything else is refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise StateNotFound(f"state '{name}' cannot be read: {e.strerror}") from e
    if stat.S_ISLNK(mode):
        raise StateNotFound(f"state '{name}' is a symbolic link; refusing to {'replace' if replacing else 'follow'} it")
    if not stat.S_ISDIR(mode):
        raise StateNotFound(f"state '{name}' is not a directory; refusing to {'replace' if replacing else 'load'} it")
    return True


def _regular_file(path: Path, file: str, name: str) -> Path:
    """`path/file`, checked to be a regular file and not a link."""
    try:
        mode = os.lstat(path / file).st_mode
    except OSError as e:
        raise StateNotFound(f"state '{name}' cannot be read: {file}: {e.strerror}") from e
    if stat.S_ISLNK(mode):
        raise StateNotFound(f"state '{name}' has a symbolic link {file}; refusing to follow it")
    if not stat.S_ISREG(mode):
        raise StateNotFound(f"state '{name}' cannot be read: {file} is not a regular file")
    return path / file


def _read_manifest(path: Path, name: str, format: str | tuple[str, ...] | None = None) -> dict:
    """The saved directory's manifest, checked field by field; of `format` (one of them; None:
    any known)."""
    try:
        manifest = json.loads(_regular_file(path, MANIFEST_FILE, name).read_bytes())
    except (OSError, ValueError) as e:
        raise StateNotFound(f"state '{name}' cannot be read: {MANIFEST_FILE}: {reason(e)}") from e
    if not isinstance(manifest, dict):
        problem = "is not a JSON object"
    elif manifest.get("format") not in ((format,) if isinstance(format, str) else format or FORMATS):
        expected = format if isinstance(format, str) else "' or '".join(format or STATE_FORMATS)
        problem = f"has format {shown(manifest.get('format'))}, expected '{expected}'"
    elif type(manifest.get("step")) is not int or manifest["step"] < 0:
        problem = "has no valid step"
    elif not isinstance(manifest.get("owner"), (str, type(None))):
        problem = "has an invalid owner"
    else:
        return manifest
    raise StateNotFound(f"state '{name}' cannot be read: {MANIFEST_FILE} {problem}")


def _read_tensors(path: Path, file: str, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(_regular_file(path, file, name))
    except (OSError, SafetensorError) as e:
        raise StateNotFound(f"state '{name}' cannot be read: {file}: {reason(e)}") from e


def _is_complete(path: Path) -> bool:
    """Whether a hidden copy is a real directory with a readable manifest (written last)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        _read_manifest(path, path.name)
    except (OSError, StateNotFound):
        return False
    return True


def shown(value: object) -> str:
    """`value` for an error message: its repr, cut to about 64 characters."""
    text = repr(value)
    size = len(value) if isinstance(value, str) else len(text)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({size} chars)"


def reason(error: Exception) -> str:
    """A library's error message, without paths and cut short (it may quote the file's content)."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return text if len(text) <= 2 * SHOWN_CHARS else f"{text[: 2 * SHOWN_CHARS]}…"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
