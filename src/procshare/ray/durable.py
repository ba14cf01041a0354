"""Durable state of Ray-hosted objects: HMAC'd snapshot files on shared storage.

A durable object's host actor writes a snapshot after every call that changed
the object, before it replies; when Ray restarts the actor (`max_restarts`)
its constructor loads the snapshot instead of building a new object.  The
snapshot also keeps the last replies per client, by request id, so a call
that Ray or the proxy re-sends after the restart gets the stored reply instead
of running twice.

Owns: the snapshot file format (magic, HMAC-SHA256 with a key derived from
the manager's authkey, then the pickled state), writing it atomically,
reading and verifying it, the trust checks on the state directory, and the
per-client table of recent replies (`Replies`).

Rules it keeps:
- A snapshot is written to a temporary file in the same directory and
  renamed over the old one, so a reader sees the old or the new state, never
  a torn one; it survives the death of the process (fsync, for power loss,
  is opt-in).
- Nothing is unpickled before its HMAC is verified: a snapshot of pickles is
  code.  State directories are made 0700; a state directory or snapshot
  file owned by another user, or writable by group or others, is refused.
- The key is derived from the authkey per manager namespace and purpose;
  only derived keys are sent to actors, never the authkey itself.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import stat
from typing import Any

from ray import cloudpickle

from ..transport.files import replace_file

__all__ = ["SnapshotStore", "Replies", "derive_key", "prepare_dir", "StateTampered"]

MAGIC = b"PSRAY1\n"
_DIGEST = hashlib.sha256().digest_size
#: replies kept per client (a client's threads have at most this many calls
#: in flight that a restart could make it re-send)
REPLIES_PER_CLIENT = 64


class StateTampered(RuntimeError):
    """A snapshot file failed its HMAC check or the trust checks."""


def derive_key(authkey: bytes, purpose: str, namespace: str) -> bytes:
    """A key for `purpose` ("state" or "connect") in manager `namespace`."""
    return hmac.new(bytes(authkey), f"procshare.ray {purpose} {namespace}".encode(),
                    hashlib.sha256).digest()


def _check_trusted(path: str, st: os.stat_result, what: str) -> None:
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise StateTampered(f"refusing {what} {path!r}: it is owned by uid {st.st_uid}, not "
                            f"by this user (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateTampered(f"refusing {what} {path!r}: it is writable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):o}); make it 0700 (0600 for files)")


def prepare_dir(directory: str) -> str:
    """Create `directory` (0700) if needed and check it can be trusted."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _check_trusted(directory, os.stat(directory), "state directory")
    return directory


class Replies:
    """The last replies per client, by request id (for exactly-once re-sends)."""

    def __init__(self, table: dict | None = None) -> None:
        self.table: dict[str, collections.OrderedDict] = {}
        for client, entries in (table or {}).items():
            self.table[client] = collections.OrderedDict(entries)

    def get(self, client: str, rid: int) -> Any:
        entries = self.table.get(client)
        return None if entries is None else entries.get(rid)

    def put(self, client: str, rid: int, reply: Any) -> None:
        entries = self.table.setdefault(client, collections.OrderedDict())
        entries[rid] = reply
        while len(entries) > REPLIES_PER_CLIENT:
            entries.popitem(last=False)

    def forget(self, client: str) -> None:
        self.table.pop(client, None)

    def dump(self) -> dict:
        return {client: list(entries.items()) for client, entries in self.table.items()}


class SnapshotStore:
    """One object's snapshot file: `<directory>/<name>.snap`."""

    def __init__(self, directory: str, name: str, key: bytes, fsync: bool = False) -> None:
        self.directory = directory
        self.path = os.path.join(directory, name.replace("/", "_") + ".snap")
        self.key = key
        self.fsync = fsync

    def load(self) -> dict | None:
        """The last snapshot, verified, or None if there is none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            _check_trusted(self.path, os.fstat(f.fileno()), "snapshot file")
            data = f.read()
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _DIGEST:
            raise StateTampered(f"{self.path!r} is not a procshare.ray snapshot")
        mac = data[len(MAGIC):len(MAGIC) + _DIGEST]
        body = data[len(MAGIC) + _DIGEST:]
        if not hmac.compare_digest(mac, hmac.new(self.key, body, hashlib.sha256).digest()):
            raise StateTampered(
                f"the HMAC of snapshot {self.path!r} does not match: it was written with "
                "another authkey, or changed since. It was not loaded.")
        return cloudpickle.loads(body)

    def save(self, state: dict) -> None:
        body = cloudpickle.dumps(state)
        mac = hmac.new(self.key, body, hashlib.sha256).digest()
        replace_file(self.path, MAGIC + mac + body, fsync=self.fsync)

    def remove(self) -> None:
        remove_file(self.path)


def remove_file(path: str | None) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
