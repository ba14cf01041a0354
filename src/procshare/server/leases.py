"""Leases: which client processes are alive, which exited, and which died.

Owns: one record per client (a process, named by its client id), its
control connections, and the decision that ends its lease.  The server asks
this module what to do; `on_end(client, pid, how)` does it.

Rules it keeps:
- Exit is not death.  A client that says goodbye has *exited*: the server
  releases its references and nothing else.  A client whose control
  connection closes without a goodbye is *disconnected*, not gone: a live
  process reconnects under the same id and keeps everything it had.
- A disconnected client has *died* when its process is gone.  On the same host
  (same hostname and pid namespace) the process is watched directly
  (`transport.processes.ProcessHandle`, opened while it was connected); a
  zombie counts as dead.  A client on
  another host has died when it has not reconnected within `grace` seconds.
- `on_end` runs once per lease, outside every lock of this module, on the
  thread that decided it (a connection thread or a watcher thread).
- A client id that comes back after its lease ended starts a new lease; what
  the old one held stays released.
- Records of ended leases are forgotten after `KEEP_ENDED` of them, oldest
  first, so a long-lived manager does not grow with every client it served.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from ..transport.processes import ProcessHandle, host_identity

__all__ = ["Leases", "ClientRecord", "GRACE"]

log = logging.getLogger("procshare.server")

#: how long a client on another host may stay disconnected before it counts as dead
GRACE = 5.0
#: how many ended leases are remembered (for "is gone" checks and introspection)
KEEP_ENDED = 4096


class ClientRecord:
    """One client process and its lease."""

    __slots__ = ("client", "pid", "local", "controls", "state", "process", "ended_at",
                 "reconnected")

    def __init__(self, client: str, pid: int, local: bool) -> None:
        self.client = client
        self.pid = pid
        self.local = local          # same host and pid namespace as the server
        self.controls = 0           # open control connections
        self.state = "live"         # live, disconnected, exited, dead
        self.process: ProcessHandle | None = None   # watched, for a local client
        self.ended_at: float | None = None
        self.reconnected = threading.Event()

    def close_process(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


class Leases:
    """The lease of every client of one server."""

    def __init__(self, on_end: Callable[[str, int, str], None], grace: float = GRACE) -> None:
        self.on_end = on_end
        self.grace = grace
        self.mutex = threading.Lock()
        self.records: dict[str, ClientRecord] = {}
        self._ended: collections.deque[str] = collections.deque()
        self._host = host_identity()

    # -- what the server reports ----------------------------------------------------
    def control_opened(self, client: str, pid: int, hello: dict) -> None:
        local = (hello.get("host"), hello.get("pidns")) == self._host and pid > 0
        with self.mutex:
            rec = self.records.get(client)
            if rec is None or rec.state in ("exited", "dead"):
                if rec is not None:
                    rec.close_process()
                rec = self.records[client] = ClientRecord(client, pid, local)
            rec.controls += 1
            if rec.state == "disconnected":
                rec.state = "live"
                rec.reconnected.set()
            if rec.local and rec.process is None:
                rec.process = ProcessHandle(pid)

    def goodbye(self, client: str) -> bool:
        """The client says it is exiting; True if its lease ends now."""
        with self.mutex:
            rec = self.records.get(client)
            if rec is None or rec.state in ("exited", "dead"):
                return False
            self._end(rec, "exited")
        self.on_end(client, rec.pid, "exited")
        return True

    def control_closed(self, client: str) -> None:
        with self.mutex:
            rec = self.records.get(client)
            if rec is None:
                return
            rec.controls -= 1
            if rec.controls > 0 or rec.state != "live":
                return
            rec.state = "disconnected"
            rec.reconnected.clear()
        if rec.local and not self._alive(rec):
            self._died(rec)
            return
        threading.Thread(target=self._watch, args=(rec,), daemon=True,
                         name=f"procshare-lease-{rec.pid}").start()

    # -- questions ------------------------------------------------------------------
    def is_gone(self, client: str) -> bool:
        """True if `client` exited or died (and has not come back)."""
        rec = self.records.get(client)
        return rec is not None and rec.state in ("exited", "dead")

    def how_gone(self, client: str) -> str | None:
        rec = self.records.get(client)
        return rec.state if rec is not None and rec.state in ("exited", "dead") else None

    def snapshot(self) -> list[dict]:
        with self.mutex:
            return [{"client": r.client, "pid": r.pid, "state": r.state, "local": r.local,
                     "control_connections": r.controls} for r in self.records.values()]

    # -- internals ------------------------------------------------------------------
    @staticmethod
    def _alive(rec: ClientRecord) -> bool:
        process = rec.process
        return process is not None and process.alive()

    def _watch(self, rec: ClientRecord) -> None:
        """Wait until a disconnected client reconnects or is known dead."""
        if not rec.local:
            if not rec.reconnected.wait(self.grace):
                self._died(rec)
            return
        process = rec.process
        while not rec.reconnected.is_set():
            if process is None or process.wait(0.25):
                self._died(rec)
                return

    def _died(self, rec: ClientRecord) -> None:
        with self.mutex:
            if rec.state != "disconnected" or self.records.get(rec.client) is not rec:
                return
            self._end(rec, "dead")
        self.on_end(rec.client, rec.pid, "died")

    def _end(self, rec: ClientRecord, state: str) -> None:
        """(mutex held) The lease of `rec` ends."""
        rec.state = state
        rec.ended_at = time.time()
        rec.close_process()
        self._ended.append(rec.client)
        while len(self._ended) > KEEP_ENDED:
            old = self._ended.popleft()
            r = self.records.get(old)
            if r is not None and r.state in ("exited", "dead"):
                del self.records[old]

    def close(self) -> None:
        with self.mutex:
            for rec in self.records.values():
                rec.close_process()
                rec.reconnected.set()

