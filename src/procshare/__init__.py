"""procshare: share objects between processes, boringly.

A drop-in replacement for `multiprocessing.managers` (use `procshare.managers`)
where every call can have a deadline, every failure says what happened, calls
on one object run one at a time, and references are counted per process.

This module is the public API only: the managers, the errors, `timeout`, and
the proxy classes users subclass.  Each name lives in the module that owns it;
internals (`State`, `ProcessLocalSet`, `dispatch`, `Server`, ...) stay in
`procshare.managers`, which mirrors every public name of
`multiprocessing.managers`.
"""

from __future__ import annotations

from typing import Any

from . import aio, managers, serializers
from .client.pipeline import async_, oneway
from .client.scope import timeout
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
    ManagerNotRunning,
    ManagerSocketMissing,
    ManagerStartFailed,
    MessageTooLarge,
    MethodRaisedExit,
    MissingMethodError,
    NotExposedError,
    ObjectLost,
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
    SetProxy,
    SyncManager,
    Token,
    Value,
    ValueProxy,
)

try:
    from .managers import SharedMemoryManager
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"

__all__ = [
    "Manager", "managers", "serializers", "timeout", "async_", "oneway", "aio",
    # errors (procshare.errors has them all, with the stdlib classes each extends)
    "ProcshareError", "RemoteError", "NotExposedError", "MissingMethodError", "CallTimeout",
    "ManagerCrashed", "MethodRaisedExit", "ObjectLost", "ManagerNotRunning", "ManagerStartFailed",
    "ManagerConnectionRefused", "ManagerSocketMissing", "ManagerConnectionReset",
    "ManagerBrokenPipe", "SerializationError", "ArgumentsNotSerializable",
    "LocalObjectNotSerializable", "ProcessLocalNotSerializable", "RemoteSerializationError",
    "ResultNotSerializable", "ArgumentsNotDeserializable", "SerializerMismatch",
    "MessageTooLarge", "BootstrapError", "DeadlockError", "OwnerDiedWarning", "AuthenticationError",
    # managers, and what they share
    "BaseManager", "SyncManager", "SharedMemoryManager", "Token", "Namespace", "Value", "Array",
    # proxy classes, to subclass or to check against
    "BaseProxy", "AutoProxy", "MakeProxyType", "IteratorProxy", "AcquirerProxy",
    "ConditionProxy", "EventProxy", "BarrierProxy", "NamespaceProxy", "ValueProxy",
    "BaseListProxy", "ListProxy", "DictProxy", "SetProxy", "BaseSetProxy", "ArrayProxy",
    "BasePoolProxy", "PoolProxy",
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
