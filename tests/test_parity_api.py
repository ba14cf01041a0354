"""Scenario 1: procshare.managers has every public name of the stdlib module,
of the same kind, and the package re-exports them."""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import multiprocessing.managers as std
import os
import types

import pytest

# The names the brief lists explicitly: present on every supported Python.
REQUIRED = set(
    """
    BaseManager SyncManager BaseProxy AutoProxy MakeProxyType Token RemoteError
    Namespace Value Array ListProxy DictProxy BaseListProxy IteratorProxy
    AcquirerProxy ConditionProxy EventProxy BarrierProxy NamespaceProxy ValueProxy
    ArrayProxy PoolProxy BasePoolProxy Server State SharedMemoryManager
    SharedMemoryServer RebuildProxy dispatch convert_to_error all_methods
    public_methods listener_client ProcessLocalSet
    """.split()
)


def _is_reexport(obj) -> bool:
    """A module, or a function/class defined elsewhere (os.getpid, ProcessError...)."""
    if isinstance(obj, types.ModuleType):
        return True
    if callable(obj):
        mod = getattr(obj, "__module__", None)
        return mod is not None and mod != std.__name__
    return False


STDLIB_PUBLIC = sorted(
    name for name, obj in vars(std).items() if not name.startswith("_") and not _is_reexport(obj)
)


def test_every_name_of_the_stdlib_module_is_there_and_all_is_the_same():
    """Its imports too (managers.connection, .pool, .format_exc...), which code
    reaches through the module; __all__ names each once, as there."""
    ps = importlib.import_module("procshare.managers")
    missing = sorted(name for name in vars(std) if not name.startswith("__")
                     and not hasattr(ps, name))
    assert not missing, missing
    assert ps.__all__ == std.__all__


def test_stdlib_exports_required_names():
    # Guards the list above against typos: every required name is public here.
    assert REQUIRED <= set(STDLIB_PUBLIC), REQUIRED - set(STDLIB_PUBLIC)


@pytest.mark.parametrize("name", STDLIB_PUBLIC)
def test_procshare_has_public_name(name):
    ps = importlib.import_module("procshare.managers")
    std_obj = getattr(std, name)
    assert hasattr(ps, name), f"procshare.managers lacks {name}"
    ps_obj = getattr(ps, name)
    if inspect.isclass(std_obj):
        assert inspect.isclass(ps_obj), f"{name} should be a class"
    elif callable(std_obj):
        assert callable(ps_obj), f"{name} should be callable"
    else:
        assert type(ps_obj) is type(std_obj), f"{name}: {type(ps_obj)} vs {type(std_obj)}"


def test_procshare_class_hierarchy_matches_stdlib():
    ps = importlib.import_module("procshare.managers")
    classes = [n for n in STDLIB_PUBLIC if inspect.isclass(getattr(std, n))]
    missing = []
    for a in classes:
        for b in classes:
            if issubclass(getattr(std, a), getattr(std, b)):
                pa, pb = getattr(ps, a, None), getattr(ps, b, None)
                if pa is None or pb is None or not issubclass(pa, pb):
                    missing.append(f"{a} <: {b}")
    assert not missing, missing
    # Exceptions stay catchable the stdlib way.
    assert issubclass(ps.RemoteError, Exception)


# Internals of the managers module: procshare.managers has them (parity), the
# package's public API does not.
INTERNAL = set(
    """
    Server State SharedMemoryServer RebuildProxy dispatch convert_to_error all_methods
    public_methods listener_client ProcessLocalSet
    """.split()
)


@pytest.mark.parametrize("name", sorted(REQUIRED - INTERNAL))
def test_procshare_package_reexports(name):
    import procshare
    import procshare.managers as ps

    assert getattr(procshare, name, None) is getattr(ps, name), (
        f"procshare.{name} should be procshare.managers.{name}"
    )
    assert name in procshare.__all__


@pytest.mark.parametrize("name", sorted(INTERNAL))
def test_procshare_package_keeps_internals_out(name):
    import procshare
    import procshare.managers as ps

    assert hasattr(ps, name)
    assert not hasattr(procshare, name) and name not in procshare.__all__


def test_manager_returns_started_syncmanager(impl):
    if impl is std:
        m = multiprocessing.Manager()
    else:
        import procshare

        m = procshare.Manager()
    try:
        assert isinstance(m, impl.SyncManager)
        lst = m.list([1, 2])  # started: it can create objects right away
        lst.append(3)
        assert lst._getvalue() == [1, 2, 3]
        del lst
    finally:
        m.shutdown()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_shared_memory_manager_blocks_go_at_shutdown(impl):
    with impl.SharedMemoryManager() as smm:
        sm = smm.SharedMemory(16)
        sm.buf[:3] = b"abc"
        sl = smm.ShareableList([1, "x"])
        assert bytes(sm.buf[:3]) == b"abc" and list(sl) == [1, "x"]
        names = [sm.name, sl.shm.name]
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
        sm.close()
        sl.shm.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_shared_memory_of_a_size_that_is_no_int_leaves_no_segment():
    """The stdlib's raises TypeError too, but leaves an empty segment behind
    (it makes the segment before it sizes it)."""
    import procshare.managers as ps

    with ps.SharedMemoryManager() as smm:
        before = set(os.listdir("/dev/shm"))
        with pytest.raises(TypeError):
            smm.SharedMemory(1.5)
        assert set(os.listdir("/dev/shm")) - before == set()
