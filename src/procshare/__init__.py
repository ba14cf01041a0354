"""procshare: share objects between processes, boringly.

A drop-in replacement for `multiprocessing.managers` (use `procshare.managers`)
where every call can have a deadline, every failure says what happened, calls
on one object run one at a time, and references are counted per process.

This module is the public API only; each name lives in the module that owns it.
"""

from __future__ import annotations

from typing import Any

from . import managers
from .callctx import timeout
from .errors import (
    ArgumentsNotDeserializable,
    ArgumentsNotSerializable,
    AuthenticationError,
    BootstrapError,
    CallTimeout,
    DeadlockError,
    LocalObjectNotSerializable,
    ManagerBrokenPipe,
    ManagerConnectionRefused,
    ManagerConnectionReset,
    ManagerCrashed,
    ManagerSocketMissing,
    NotExposedError,
    OwnerDiedWarning,
    ProcessLocalNotSerializable,
    ProcshareError,
    RemoteError,
    RemoteSerializationError,
    ResultNotSerializable,
    SerializationError,
    SerializerMismatch,
)
from .managers import (
    AcquirerProxy,
    Array,
    ArrayProxy,
    AutoProxy,
    BarrierProxy,
    BaseListProxy,
    BaseManager,
    BasePoolProxy,
    BaseProxy,
    BaseSetProxy,
    ConditionProxy,
    DictProxy,
    EventProxy,
    IteratorProxy,
    ListProxy,
    MakeProxyType,
    Namespace,
    NamespaceProxy,
    PoolProxy,
    ProcessLocalSet,
    RebuildProxy,
    SetProxy,
    State,
    SyncManager,
    Token,
    Value,
    ValueProxy,
    all_methods,
    convert_to_error,
    dispatch,
    listener_client,
    public_methods,
)
from .server import Server

try:
    from .managers import SharedMemoryManager, SharedMemoryServer
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"

__all__ = [
    "Manager", "managers", "timeout",
    # errors (procshare.errors has them all, with the stdlib classes each extends)
    "ProcshareError", "RemoteError", "NotExposedError", "CallTimeout", "ManagerCrashed",
    "ManagerConnectionRefused", "ManagerSocketMissing", "ManagerConnectionReset",
    "ManagerBrokenPipe", "SerializationError", "ArgumentsNotSerializable",
    "LocalObjectNotSerializable", "ProcessLocalNotSerializable", "RemoteSerializationError",
    "ResultNotSerializable", "ArgumentsNotDeserializable", "SerializerMismatch",
    "BootstrapError", "DeadlockError", "OwnerDiedWarning", "AuthenticationError",
    "BaseManager", "SyncManager", "SharedMemoryManager", "Server", "BaseProxy", "AutoProxy",
    "MakeProxyType", "Token", "Namespace", "Value", "Array", "IteratorProxy", "AcquirerProxy",
    "ConditionProxy", "EventProxy", "BarrierProxy", "NamespaceProxy", "ValueProxy",
    "BaseListProxy", "ListProxy", "DictProxy", "SetProxy", "ArrayProxy", "BasePoolProxy",
    "PoolProxy", "BaseSetProxy", "ProcessLocalSet", "RebuildProxy", "State", "SharedMemoryServer",
    "all_methods", "convert_to_error", "dispatch", "listener_client", "public_methods",
]


def Manager(*, ctx: Any = None, **kwargs: Any) -> SyncManager:
    """Return a started `SyncManager`, like `multiprocessing.Manager()`.

    Keyword arguments (`address`, `authkey`, `call_timeout`, ...) go to SyncManager.
    """
    if ctx is None:
        import multiprocessing
        ctx = multiprocessing.get_context()
    m = SyncManager(ctx=ctx, **kwargs)
    m.start()
    return m
