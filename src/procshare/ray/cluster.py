"""Cluster: this process's connection to Ray, and the addresses of Ray managers.

A Ray manager's address is `ray://<cluster>/<namespace>`: the Ray cluster
(its GCS address, or `auto`) and the Ray namespace whose named actors hold
the manager's objects.  Any process that unpickles a proxy, or calls
`RayManager(address=...).connect()`, joins that cluster here on first use.

Owns: `RayAddress` and its parsing, joining a running cluster or starting a
local one (and remembering which this process did), and the fork check.

Rules it keeps:
- No Ray API is called before `ensure_connected()`: many of them would start
  a local cluster of their own when Ray is not initialized.
- A process that is already connected to Ray (a driver, or a Ray worker
  running a task or an actor) is used as it is; a process that is not joins
  the cluster named in the address, without the dashboard and without
  streaming worker logs.
- A local cluster is started only by `start_or_join()` (a manager's
  `start()`), and only `stop_if_started()` stops it: shutting a manager down
  never stops a cluster this process merely joined.
- A RayAddress unpickles by importing this package, which registers the
  `ray://` session factory: a child process that receives a proxy needs
  nothing else.
- Ray does not survive `fork()`: a process forked from one connected to Ray
  gets a clear error, never a hang.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

from ..errors import ProcshareError

__all__ = ["PREFIX", "RayAddress", "ForkedRayError", "ensure_connected", "start_or_join",
           "stop_if_started", "init_seconds"]

PREFIX = "ray://"

#: how this process is connected: None (not by us), "joined" or "started"
_how: str | None = None
_pid_connected: int | None = None      # the process that connected (fork check)
_init_seconds: float | None = None     # how long our ray.init() took
_mutex = threading.RLock()
_forked_connected = False


class ForkedRayError(ProcshareError, RuntimeError):
    """This process was forked from one connected to Ray, which Ray does not support."""


class RayAddress(str):
    """`ray://<cluster>/<namespace>`: where a Ray manager's objects live."""

    __slots__ = ()

    def __new__(cls, value: str) -> RayAddress:
        if not isinstance(value, str) or not value.startswith(PREFIX):
            raise ValueError(f"a Ray manager address looks like 'ray://<cluster>/<namespace>' "
                             f"(cluster: a GCS address host:port, or 'auto'), not {value!r}")
        rest = value[len(PREFIX):]
        cluster, sep, namespace = rest.rpartition("/")
        if not sep or not cluster or not namespace:
            raise ValueError(f"a Ray manager address looks like 'ray://<cluster>/<namespace>', "
                             f"not {value!r}")
        return super().__new__(cls, value)

    @classmethod
    def make(cls, cluster: str, namespace: str) -> RayAddress:
        return cls(f"{PREFIX}{cluster}/{namespace}")

    @property
    def cluster(self) -> str:
        return self[len(PREFIX):].rpartition("/")[0]

    @property
    def namespace(self) -> str:
        return self.rpartition("/")[2]

    def __reduce__(self) -> tuple:
        return (RayAddress, (str(self),))


def _after_fork_in_child() -> None:
    global _forked_connected, _how, _pid_connected
    if ray.is_initialized():
        _forked_connected = True
    _how, _pid_connected = None, None


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_fork() -> None:
    """Raise ForkedRayError in a process forked from one connected to Ray."""
    if _forked_connected:
        raise ForkedRayError(
            f"this process (pid {os.getpid()}) was forked from a process connected to Ray, "
            "and Ray does not work across fork(): its threads and connections stay in the "
            "parent. Start processes that use procshare.ray proxies with "
            "multiprocessing.get_context('spawn') or get_context('forkserver') (or as Ray "
            "tasks and actors).")


def ensure_connected(address: RayAddress | None = None) -> None:
    """Connect this process to the cluster of `address` unless it is connected to
    Ray already."""
    global _how, _pid_connected, _init_seconds
    check_fork()
    if ray.is_initialized():
        return
    with _mutex:
        if ray.is_initialized():
            return
        cluster = address.cluster if address is not None else "auto"
        t0 = time.monotonic()
        ray.init(address=cluster, log_to_driver=False, logging_level=logging.WARNING,
                 ignore_reinit_error=True)
        _init_seconds = time.monotonic() - t0
        _how, _pid_connected = "joined", os.getpid()


def start_or_join(cluster: str | None, init_kwargs: dict | None = None) -> tuple[str, bool]:
    """For a manager's `start()`: use this process's Ray connection, or join the
    cluster `cluster` ("auto": one running on this machine), or start a local
    cluster (no dashboard).  Returns (the cluster's GCS address, whether this
    call started a cluster)."""
    global _how, _pid_connected, _init_seconds
    check_fork()
    with _mutex:
        started = False
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, "logging_level": logging.WARNING}
            kwargs.update(init_kwargs or {})
            t0 = time.monotonic()
            try:
                ray.init(address=cluster or "auto", **kwargs)
                _how = "joined"
            except ConnectionError:
                if cluster not in (None, "auto"):
                    raise
                kwargs.setdefault("include_dashboard", False)
                ray.init(**kwargs)
                _how, started = "started", True
            _init_seconds = time.monotonic() - t0
            _pid_connected = os.getpid()
        return ray.get_runtime_context().gcs_address, started


def stop_if_started() -> bool:
    """Stop the local cluster if this process started it (True if it did)."""
    global _how, _pid_connected
    with _mutex:
        if _how != "started" or _pid_connected != os.getpid():
            return False
        ray.shutdown()
        _how, _pid_connected = None, None
        return True


def connected_by_us() -> str | None:
    """"joined" or "started" if procshare connected this process to Ray, else None."""
    return _how if _pid_connected == os.getpid() else None


def init_seconds() -> float | None:
    """How long this process's `ray.init()` took, when procshare called it."""
    return _init_seconds


def current_job() -> str | None:
    try:
        return ray.get_runtime_context().get_job_id()
    except Exception:
        return None
