"""Checkpoint archives of the Tinker front: signed, short-lived download URLs, and the tar stream
such a URL answers.

A URL is `/api/v1/checkpoint_archives/<token>` on the front's own port. The token names who asked
(the identity), which checkpoint (kind and cispo name) and until when; it is signed with a key
this server process drew at random, so it cannot be forged or altered, and it dies with the
process or after ARCHIVE_SECONDS. It needs no API key (the SDK's users fetch such URLs with
`urllib.request.urlretrieve`); whoever holds it downloads as the identity that asked for it, and
the checkpoint is looked up again, as that identity, when it is fetched.

The archive is a plain tar of the checkpoint directory's files at its top level. Every file is
opened before the first byte is sent, so a save that replaces the checkpoint, or its deletion,
while it streams does not change what is sent; it is read in chunks, never whole.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cispo.service.tinker_errors import HttpError

ARCHIVE_SECONDS = 15 * 60
"""How long an archive URL may be used."""
CHUNK_BYTES = 1 << 20
BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Grant:
    """What an archive URL lets its holder download."""

    owner: str | None  # the identity that asked for it
    kind: str  # "weights" (a state) or "sampler_weights" (an export)
    name: str  # the cispo name
    created: float  # when that checkpoint was saved: a later one of the same name is another
    expires: float  # unix time


class ArchiveSigner:
    """Signs and checks archive tokens with a key of this process."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def sign(self, grant: Grant) -> str:
        payload = _b64(json.dumps([grant.owner, grant.kind, grant.name, grant.created, grant.expires]).encode())
        return f"{payload}.{_b64(self._mac(payload))}"

    def check(self, token: str) -> Grant:
        """The grant of a token this process signed and that has not expired; HttpError 403
        otherwise (a forged, altered or expired token, or one of an earlier server process)."""
        payload, _, mac = token.partition(".")
        try:  # binascii.Error is a ValueError
            if not hmac.compare_digest(_unb64(mac), self._mac(payload)):
                raise ValueError("not signed here")
            owner, kind, name, created, expires = json.loads(_unb64(payload))
            if expires < time.time():
                raise ValueError("expired")
        except (ValueError, TypeError):
            raise HttpError(403, "this archive URL is not valid (altered, or expired): ask for a new one") from None
        return Grant(owner, kind, name, float(created), float(expires))

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Member:
    """One file of an archive, opened."""

    name: str
    file: BinaryIO
    size: int
    header: bytes  # its tar header

    @property
    def padded(self) -> int:
        return -self.size % BLOCK


def open_members(directory: Path) -> list[Member]:
    """Every regular file of `directory`, opened (links are never followed, nothing else is
    read), sorted by name; nothing stays open if one cannot be opened. The directory is opened
    first, so every file is of the one directory even if a save swaps another in meanwhile."""
    members: list[Member] = []
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for entry in sorted(os.listdir(dir_fd)):
            file = os.fdopen(os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd), "rb")
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                file.close()
                continue
            header = tarfile.TarInfo(entry)
            header.size, header.mtime, header.mode = info.st_size, int(info.st_mtime), 0o644
            members.append(Member(entry, file, info.st_size, header.tobuf(tarfile.PAX_FORMAT)))
    except BaseException:
        close(members)
        raise
    finally:
        os.close(dir_fd)
    return members


def close(members: list[Member]) -> None:
    for member in members:
        member.file.close()


def archive_size(members: list[Member]) -> int:
    """The tar's length in bytes: headers, data padded to blocks, two zero blocks at the end."""
    return sum(len(m.header) + m.size + m.padded for m in members) + 2 * BLOCK


async def tar_stream(members: list[Member]) -> AsyncIterator[bytes]:
    """The tar of `members`, in chunks read off the event loop; closes them when done (or when
    the client goes away)."""
    try:
        for member in members:
            yield member.header
            left = member.size
            while left:
                chunk = await asyncio.to_thread(member.file.read, min(left, CHUNK_BYTES))
                if not chunk:  # never for a saved checkpoint's files, which are never rewritten
                    raise OSError(f"{member.name} ended {left} bytes early")
                left -= len(chunk)
                yield chunk
            yield b"\0" * member.padded
        yield b"\0" * (2 * BLOCK)
    finally:
        close(members)
