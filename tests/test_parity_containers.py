"""Scenarios 3 and 4: list, dict, (set), Namespace, Value, Array.

Each operation script runs once on a plain Python object and once on a
managed proxy; the logs of observable results must be identical.  The stdlib
and procshare are both held to the same plain-Python reference, so they agree
with each other too."""

from __future__ import annotations

import array
import ctypes
import re
import sys

import pytest

import _workers

PY314 = sys.version_info >= (3, 14)


# The Python 3.14 additions run against the stdlib only where it has them;
# procshare must have them on every Python it supports.
only_where_supported = pytest.mark.parametrize(
    "impl", ["stdlib", "procshare"] if PY314 else ["procshare"], indirect=True)


def _catch(log, label, func, *args):
    try:
        log.append((label, func(*args)))
    except Exception as exc:
        log.append((label, "raised", type(exc).__name__))


def list_script(lst):
    log = []
    lst.append(1)
    lst.extend([5, 3, 3, 8])
    lst.insert(0, 9)
    lst.insert(-1, 7)
    log.append(("after-insert", lst[:]))
    log.append(("pop", lst.pop()))
    log.append(("pop0", lst.pop(0)))
    lst.remove(3)
    _catch(log, "remove-missing", lst.remove, 42)
    log.append(("index", lst.index(5)))
    _catch(log, "index-missing", lst.index, 42)
    log.append(("count3", lst.count(3)))
    log.append(("count42", lst.count(42)))
    log.append(("neg1", lst[-1]))
    log.append(("neg2", lst[-2]))
    _catch(log, "getitem-out-of-range", lambda i: lst[i], 100)
    log.append(("len", len(lst)))
    log.append(("contains5", 5 in lst))
    log.append(("contains42", 42 in lst))
    log.append(("slice", lst[1:3]))
    log.append(("slice-step", lst[::-1]))
    lst[0] = 100
    lst[1:3] = ["a", "b", "c"]
    log.append(("after-slice-assign", lst[:]))
    del lst[0]
    del lst[0:2]
    log.append(("after-del", lst[:]))
    lst.extend([4, 2, 6])
    lst.remove("c")
    lst.sort()
    log.append(("sorted", lst[:]))
    lst.sort(reverse=True)
    log.append(("sorted-rev", lst[:]))
    lst.sort(key=str)
    log.append(("sorted-key", lst[:]))
    lst.reverse()
    log.append(("reversed-inplace", lst[:]))
    before = lst
    lst += [10, 11]
    log.append(("iadd-same-object", lst is before))
    lst *= 2
    log.append(("imul-same-object", lst is before))
    log.append(("after-iadd-imul", lst[:]))
    log.append(("add", lst + ["x"]))
    log.append(("mul", lst * 2))
    log.append(("rmul", 2 * lst))
    log.append(("list()", list(lst)))
    log.append(("reversed()", list(reversed(lst))))
    log.append(("len-final", len(lst)))
    return log


def dict_script(d):
    log = []
    d["a"] = 1
    d["b"] = [1, 2]
    d[3] = "three"
    log.append(("getitem", d["a"]))
    _catch(log, "getitem-missing", lambda k: d[k], "zz")
    log.append(("get", d.get("b")))
    log.append(("get-default", d.get("zz", "dflt")))
    log.append(("get-none", d.get("zz")))
    log.append(("setdefault-new", d.setdefault("s", [])))
    log.append(("setdefault-old", d.setdefault("a", 99)))
    d.update({"u": 1, "a": 2}, kw="arg")
    d.update([("pair", 0)])
    log.append(("keys", list(d.keys())))
    log.append(("values", list(d.values())))
    log.append(("items", list(d.items())))
    log.append(("iter", [k for k in d]))
    log.append(("contains-a", "a" in d))
    log.append(("contains-zz", "zz" in d))
    log.append(("len", len(d)))
    log.append(("pop", d.pop("u")))
    log.append(("pop-default", d.pop("zz", None)))
    _catch(log, "pop-missing", d.pop, "zz")
    log.append(("popitem", d.popitem()))
    del d[3]
    _catch(log, "del-missing", d.__delitem__, "zz")
    log.append(("copy", d.copy()))
    log.append(("copy-type", type(d.copy()).__name__))
    d.clear()
    log.append(("len-cleared", len(d)))
    _catch(log, "popitem-empty", d.popitem)
    d["z"] = 26
    return log


def test_list(manager):
    proxy = manager.list([0])
    expected = [0]
    assert list_script(proxy) == list_script(expected)
    assert proxy._getvalue() == expected
    assert type(proxy._getvalue()) is list
    assert str(proxy) == repr(expected)
    assert re.fullmatch(r"<ListProxy object, typeid 'list' at 0x[0-9a-f]+>", repr(proxy))


def test_dict(manager):
    proxy = manager.dict()
    expected = {}
    assert dict_script(proxy) == dict_script(expected)
    assert proxy._getvalue() == expected == {"z": 26}
    assert type(proxy._getvalue()) is dict
    assert str(proxy) == repr(expected)
    assert re.fullmatch(r"<DictProxy object, typeid 'dict' at 0x[0-9a-f]+>", repr(proxy))


def test_dict_constructor_and_view_types(manager):
    d = manager.dict({"x": 1}, y=2)
    assert d._getvalue() == {"x": 1, "y": 2}
    # The stdlib sends keys()/values()/items() back as lists.
    assert d.keys() == ["x", "y"]
    assert d.values() == [1, 2]
    assert d.items() == [("x", 1), ("y", 2)]
    d2 = manager.dict([("k", "v")])
    assert d2._getvalue() == {"k": "v"}


def test_list_seen_from_child(manager, ctx):
    lst = manager.list(range(5))
    lst.reverse()
    assert _workers.run_child(ctx, _workers.list_snapshot, lst) == [4, 3, 2, 1, 0]


# -- Python 3.14 additions: procshare has them on 3.10+ ----------------------


@only_where_supported
def test_list_clear_copy_314(impl, manager):
    lst = manager.list([1, 2, 3])
    c = lst.copy()
    assert c == [1, 2, 3] and type(c) is list
    c.append(4)  # a plain copy: the referent is unchanged
    assert lst._getvalue() == [1, 2, 3]
    assert lst.clear() is None
    assert len(lst) == 0
    assert lst._getvalue() == []


@only_where_supported
def test_dict_or_ior_fromkeys_reversed_314(impl, manager):
    d = manager.dict({"a": 1, "b": 2})
    merged = d | {"b": 20, "c": 3}
    assert merged == {"a": 1, "b": 20, "c": 3} and type(merged) is dict
    assert d._getvalue() == {"a": 1, "b": 2}  # `|` does not mutate
    same = d
    d |= {"c": 3, "a": 10}
    assert d is same  # `|=` keeps the proxy
    assert d._getvalue() == {"a": 10, "b": 2, "c": 3}
    assert d.fromkeys(["x", "y"], 0) == {"x": 0, "y": 0}
    assert d.fromkeys("pq") == {"p": None, "q": None}
    if PY314:
        assert list(reversed(d)) == ["c", "b", "a"]


def test_reversed_dict_proxy(impl, manager):
    """reversed() on a DictProxy: the keys, last first, where the stdlib's
    proxy has `__reversed__` (3.14); before, Python's fallback to `len` and
    `d[i]`, which procshare must not change: the values at keys n-1 .. 0."""
    d = manager.dict({0: "a", 1: "b"})
    assert list(reversed(d)) == ([1, 0] if PY314 else ["b", "a"])
    named = manager.dict({"x": 1})
    if PY314:
        assert list(reversed(named)) == ["x"]
    else:
        with pytest.raises(KeyError):
            list(reversed(named))


@only_where_supported
def test_set_314(impl, manager):
    s = manager.set([1, 2])
    s.add(3)
    s.add(3)
    s.discard(1)
    s.discard(42)  # no error
    assert 2 in s and 1 not in s
    assert len(s) == 2
    same = s
    s |= {4, 5}
    assert s is same
    inter = s & {2, 4, 9}
    assert inter == {2, 4} and type(inter) is set
    assert s._getvalue() == {2, 3, 4, 5}
    assert type(s._getvalue()) is set
    assert sorted(manager.set()._getvalue()) == []


@only_where_supported
def test_lock_locked_314(impl, manager):
    lock = manager.Lock()
    assert lock.locked() is False
    assert lock.acquire() is True
    assert lock.locked() is True
    lock.release()
    assert lock.locked() is False


# -- Scenario 4: Namespace, Value, Array -------------------------------------


def test_namespace(manager):
    ns = manager.Namespace(a=1, b="two")
    assert ns.a == 1 and ns.b == "two"
    ns.c = [3]
    ns.a = 10
    assert ns.c == [3] and ns.a == 10
    del ns.b
    with pytest.raises(AttributeError):
        _ = ns.b
    with pytest.raises(AttributeError):
        _ = ns.missing
    assert str(ns) == "Namespace(a=10, c=[3])"
    assert re.fullmatch(r"<NamespaceProxy object, typeid 'Namespace' at 0x[0-9a-f]+>", repr(ns))
    # Nested plain values are copies: mutating them does not write back.
    ns.c.append(4)
    assert ns.c == [3]


def test_namespace_from_child(manager, ctx):
    lst, d, ns, q = manager.list(), manager.dict(), manager.Namespace(x=1), manager.Queue()
    got = _workers.run_child(ctx, _workers.use_proxies, lst, d, ns, q)
    assert got == (["child"], ["child"], 2)
    assert ns.x == 2
    assert q.get(timeout=5) == "child"
    assert d["child"] != 0


def test_value(manager):
    v = manager.Value("i", 5)
    assert v.value == 5
    assert v.get() == 5
    v.value = 7
    assert v.get() == 7
    v.set(9)
    assert v.value == 9
    assert str(v) == "Value('i', 9)"
    assert re.fullmatch(r"<ValueProxy object, typeid 'Value' at 0x[0-9a-f]+>", repr(v))
    d = manager.Value("d", 1.5)
    d.value += 1
    assert d.value == 2.5


def test_array(manager):
    a = manager.Array("i", [1, 2, 3, 4])
    assert len(a) == 4
    assert a[0] == 1 and a[-1] == 4
    a[1] = 20
    assert a[1] == 20
    assert a[1:3] == array.array("i", [20, 3])
    assert list(a) == [1, 20, 3, 4]  # iteration through __getitem__/__iter__
    value = a._getvalue()
    assert value == array.array("i", [1, 20, 3, 4])
    assert type(value) is array.array and value.typecode == "i"
    with pytest.raises(IndexError):
        a[10]
    assert re.fullmatch(r"<ArrayProxy object, typeid 'Array' at 0x[0-9a-f]+>", repr(a))


class _PointerStruct(ctypes.Structure):
    _fields_ = [("p", ctypes.POINTER(ctypes.c_int))]


class _RefusesPickling:
    def __reduce__(self):
        raise KeyError("not today")


class _FailsToPickleWithOSError:
    def __reduce__(self):
        raise OSError(5, "the device said no")


def test_an_argument_pickle_refuses_raises_the_picklers_own_error_type(impl, manager):
    """The stdlib lets pickle's own exception through a proxy call; procshare's
    ArgumentsNotSerializable is also an instance of it, so `except` clauses
    written for the stdlib still catch it.  Nothing was sent: the proxy works."""
    lst = manager.list()
    with pytest.raises(ValueError):         # ctypes: "...containing pointers cannot be pickled"
        lst.append(_PointerStruct())
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        lst.append(deep)
    with pytest.raises(KeyError):
        lst.append(_RefusesPickling())
    with pytest.raises(OSError) as info:    # (not a crash of the manager: nothing was sent)
        lst.append(_FailsToPickleWithOSError())
    assert info.value.errno == 5
    assert lst._getvalue() == []
    lst.append(1)
    assert lst._getvalue() == [1]
