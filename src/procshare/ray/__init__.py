"""procshare on Ray: the managers API with Ray actors as the engine.

`procshare.ray.RayManager` has the `SyncManager` surface (and
`RayBaseManager` the `BaseManager` one): register types, `start()` or
`connect()`, create shared objects and pass their proxies to Ray tasks and
actors or to `multiprocessing` processes.  Each object is a Ray actor;
durable objects keep their state across a crash of their worker process.

Owns: the public names of the Ray backend.

Rules it keeps:
- Importing it needs Ray (`pip install 'procshare[ray]'`); it says so when
  Ray is missing.  Importing it registers the `ray://` session factory with
  the core, so proxies of Ray managers work in this process.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised where Ray is missing
    raise ImportError(
        "procshare.ray needs Ray: pip install 'procshare[ray]' (or pip install 'ray>=2.9')"
    ) from e

from .api import actor_info, call_async
from .cluster import ForkedRayError, RayAddress, init_seconds
from .managers import Array, Namespace, RayBaseManager, RayManager, RaySpec, Value
from .session import RayConnection, RaySession

__all__ = ["RayManager", "RayBaseManager", "RaySpec", "RayAddress", "RaySession",
           "RayConnection", "ForkedRayError", "Namespace", "Value", "Array", "call_async",
           "actor_info", "init_seconds"]
