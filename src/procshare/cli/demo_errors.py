"""Demo scenes for failures: ``python -m procshare demo serialization timeout crash ...``.

Owns: one scene per failure of the seed document's troubleshooting guide
that procshare explains instead of leaving to the user: an argument that cannot be
serialized, a call that would hang, a manager that is killed, a wrong authkey and a method
that is not exposed.  Each scene makes the failure happen for real, prints the error
procshare raises, checks that it carries the facts it promises, and (where that is quick
and cannot hang) shows what the stdlib does in the same situation.

Rules it keeps: the same as `procshare.cli.demo` (module-level classes, bounded
waits, plain text).  `demo.py` imports this module once, at its end, so the scenes are
registered after the seed's own two.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers as std_managers
import os
import signal
import textwrap
import threading
import time

import procshare
import procshare.managers as managers
from procshare.cli.scenes import Demo, scene


def _show(demo: Demo, label: str, exc: BaseException) -> None:
    """Print an exception the way a traceback's last line shows it, wrapped."""
    name = type(exc).__module__ + "." + type(exc).__qualname__
    if type(exc).__module__ == "builtins":
        name = type(exc).__qualname__
    demo.line(f"  {label}:")
    for i, para in enumerate(f"{name}: {exc}".strip().splitlines()):
        wrapped = textwrap.fill(para, 74, initial_indent="    ", subsequent_indent="      ")
        demo.line(wrapped if i == 0 else "    " + para)
    demo.line()


# --------------------------------------------------------------------------------------------
# Serialization error
# --------------------------------------------------------------------------------------------


@scene(
    "serialization",
    "Serialization error: which argument, where, and what would work",
    "an unpicklable argument deep in a dict: the path to it, and a serializer that works",
)
def serialization_scene(demo: Demo) -> bool:
    demo.say(
        """
        The seed's first error: an object that cannot be pickled is passed to a proxy. Here a
        job description carries a threading.Lock two levels down, and a callback that is a
        lambda. The stdlib says only which type failed, not which argument or method.
        """
    )
    demo.code(
        """
        jobs = manager.dict()
        jobs["resize"] = {"size": (640, 480), "cfg": ["fast", threading.Lock()]}
        jobs["notify"] = {"callback": lambda result: print(result)}
        """
    )
    demo.flush()
    job = {"size": (640, 480), "cfg": ["fast", threading.Lock()]}
    if demo.compare_stdlib:
        with std_managers.SyncManager() as m:
            jobs = m.dict()
            try:
                jobs["resize"] = job
            except Exception as e:
                _show(demo, "stdlib", e)
    ok = False
    with procshare.Manager() as m:
        jobs = m.dict()
        try:
            jobs["resize"] = job
        except procshare.SerializationError as e:
            _show(demo, "procshare", e)
            ok = (e.path == "args[1]['cfg'][1]" and "<_thread.lock object>" in str(e)
                  and e.direction == "arguments" and "__setitem__" in str(e)
                  and isinstance(e, TypeError))
        try:
            jobs["notify"] = {"callback": lambda result: print(result)}
        except procshare.SerializationError as e:
            _show(demo, "procshare", e)
            ok = ok and e.path == "args[1]['callback']"
        jobs["resize"] = {"size": (640, 480), "cfg": ["fast"]}
        demo.result("next call", f"jobs['resize'] = {jobs['resize']!r}", ok)
    demo.line()
    demo.say(
        """
        procshare names the method (__setitem__), the direction (arguments: nothing was
        sent, so the dict and the connection are untouched), the path inside the argument,
        the serializer in use, and which installed serializer would carry the value. A
        lock cannot be carried by any: it only means something inside one process, so the
        message points to the manager's own Lock. A lambda can: with
        serializer="cloudpickle" on the manager (or on one registered type), it works.
        A result that cannot be serialized is reported the same way, as a
        ResultNotSerializable (a RemoteError, as in the stdlib), and the next call works.
        """
    )
    return ok


# --------------------------------------------------------------------------------------------
# Timeout
# --------------------------------------------------------------------------------------------


@scene(
    "timeout",
    "Timeout: a call that would hang forever gives up at its deadline",
    "q.get() on an empty queue under procshare.timeout(0.5): CallTimeout, nothing lost",
)
def timeout_scene(demo: Demo) -> bool:
    demo.say(
        """
        The seed's second error: a call through a proxy that never returns. With the stdlib,
        q.get() on an empty queue blocks forever, and Ctrl-C leaves the connection out of
        step. procshare gives every call a deadline (per call, per proxy, per manager, or for
        a block of code). The deadline travels to the manager, so the get gives up there
        too: no item can be taken by a call that already failed.
        """
    )
    demo.code(
        """
        q = manager.Queue()
        with procshare.timeout(0.5):
            q.get()                  # CallTimeout after 0.5 s
        q.put("job"); q.get()        # the same proxy keeps working
        """
    )
    demo.flush()
    ok = False
    with procshare.Manager() as m:
        q = m.Queue()
        t0 = time.monotonic()
        try:
            with procshare.timeout(0.5):
                q.get()
        except procshare.CallTimeout as e:
            took = time.monotonic() - t0
            _show(demo, "procshare", e)
            ok = 0.45 <= took < 2.0 and isinstance(e, TimeoutError)
            demo.result("waited", f"{took:.2f} s", ok)
        q.put("job")
        got = q.get(timeout=5)
        ok = ok and got == "job"
        demo.result("next call", f"q.put('job'); q.get() -> {got!r}", got == "job")
    demo.line()
    return ok


# --------------------------------------------------------------------------------------------
# Manager crash
# --------------------------------------------------------------------------------------------


def _blocked_get(q, out: list) -> None:
    t0 = time.monotonic()
    try:
        q.get()
        out.append(("returned", None, 0.0))
    except BaseException as e:  # report whatever arrives
        out.append(("raised", e, time.monotonic() - t0))


@scene(
    "crash",
    "Manager crash: SIGKILL the manager while a call waits in it",
    "ManagerCrashed within a second, with the signal and the manager's last log lines",
)
def crash_scene(demo: Demo) -> bool:
    demo.say(
        """
        The seed's third error: the manager process dies (the OOM killer, a kill -9). With
        the stdlib, every proxy raises whatever the socket said (EOFError, BrokenPipeError,
        ConnectionRefusedError, FileNotFoundError) and nothing says why. procshare raises one
        error, ManagerCrashed (a ConnectionError and an EOFError, so old except clauses still
        work), that says which manager, how it died, and what it logged last.
        """
    )
    demo.code(
        """
        q = manager.Queue()
        threading.Thread(target=q.get).start()   # a call waiting inside the manager
        os.kill(manager.pid, signal.SIGKILL)
        """
    )
    demo.flush()
    if demo.compare_stdlib:
        m = std_managers.SyncManager()
        m.start()
        sq = m.Queue()
        os.kill(m._process.pid, signal.SIGKILL)
        m._process.join(5)
        try:
            sq.put(1)
        except Exception as e:
            _show(demo, "stdlib", e)
        m.shutdown()
    ok = False
    with procshare.Manager() as m:
        q = m.Queue()
        out: list = []
        t = threading.Thread(target=_blocked_get, args=(q, out), daemon=True)
        t.start()
        time.sleep(0.3)                       # let the get reach the manager
        os.kill(m.pid, signal.SIGKILL)
        t.join(5)
        if out and out[0][0] == "raised":
            _, e, took = out[0]
            _show(demo, "procshare", e)
            ok = (isinstance(e, procshare.ManagerCrashed) and "SIGKILL" in str(e)
                  and took < 1.5)
            demo.result("arrived", f"{took:.2f} s after the call started (0.3 s before the "
                                   "kill)", ok)
        else:
            demo.result("blocked get", f"{out!r}", False)
    demo.line()
    demo.say(
        """
        The error arrives as soon as the manager's sockets close, never as a hang. The log
        lines come from a log file the manager process writes in a private temporary
        directory; it is removed when the manager object shuts down.
        """
    )
    return ok


@scene(
    "durable",
    "Manager restart: a SIGKILLed manager comes back, durable objects intact",
    "the supervisor restarts the manager; a durable dict keeps every write, a plain one "
    "says ObjectLost",
)
def durable_scene(demo: Demo) -> bool:
    demo.say(
        """
        The stdlib's manager stays dead after a crash, and so do all its objects. procshare's
        manager is supervised by the process that started it: killed, it is back on the same
        address at once. Objects made with durable=True keep a journal (SQLite, one commit
        per write, shared by concurrent writers), so they come back with every write the
        manager had acknowledged; the others raise ObjectLost, which says so.
        """
    )
    demo.code(
        """
        results = manager.dict(durable=True)     # journaled
        scratch = manager.dict()                 # not
        for i in range(1000): results[i] = i * i
        os.kill(manager.pid, signal.SIGKILL)
        len(results), scratch["x"]
        """
    )
    demo.flush()
    with procshare.Manager() as m:
        results, scratch = m.dict(durable=True), m.dict(x=1)
        for i in range(1000):
            results[i] = i * i
        pid = m.pid
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        n = len(results)            # reconnects to the restarted manager
        took = time.monotonic() - t0
        ok = n == 1000 and results[999] == 999 * 999 and m.pid != pid
        demo.result("durable dict", f"{n} keys, results[999] = {results[999]}, back "
                                    f"{took:.2f} s after the kill (pid {pid} -> {m.pid})", ok)
        try:
            scratch["x"]
            ok = False
            demo.result("plain dict", "still there?", False)
        except procshare.ObjectLost as e:
            _show(demo, "plain dict", e)
    demo.line()
    demo.say(
        """
        A call in flight at the moment of the crash is sent again to the new manager with
        the same request id, and the journal answers it from its stored reply if it had
        already run: no write is lost and none is applied twice. With state_dir=, durable
        objects also outlive the program: manager.dict(durable=True, name="results")
        attaches to the same dict next time.
        """
    )
    return ok


# --------------------------------------------------------------------------------------------
# Wrong authkey
# --------------------------------------------------------------------------------------------


@scene(
    "authkey",
    "Wrong authkey: who refused whom, and the usual causes",
    "connecting with another authkey: an AuthenticationError that explains itself",
)
def authkey_scene(demo: Demo) -> bool:
    demo.say(
        """
        A manager only serves processes that know its authkey. A process started by
        multiprocessing inherits it; a separate script, a subprocess or another machine has
        a different random key, and the stdlib then says only "digest sent was rejected".
        """
    )
    demo.code(
        """
        server = SyncManager(authkey=b"right key"); server.start()
        other = SyncManager(address=server.address, authkey=b"wrong key")
        other.connect()
        """
    )
    demo.flush()
    if demo.compare_stdlib:
        with std_managers.SyncManager(authkey=b"right key") as server:
            other = std_managers.SyncManager(address=server.address, authkey=b"wrong key")
            try:
                other.connect()
            except multiprocessing.AuthenticationError as e:
                _show(demo, "stdlib", e)
    ok = False
    with procshare.SyncManager(authkey=b"right key") as server:
        other = procshare.SyncManager(address=server.address, authkey=b"wrong key")
        try:
            other.connect()
        except multiprocessing.AuthenticationError as e:
            _show(demo, "procshare", e)
            ok = "rejected" in str(e) and "Usual causes" in str(e)
        demo.result("is a", "multiprocessing.AuthenticationError, as in the stdlib", ok)
    demo.line()
    return ok


# --------------------------------------------------------------------------------------------
# Method not exposed
# --------------------------------------------------------------------------------------------


class Account:
    def __init__(self) -> None:
        self._balance = 100

    def balance(self) -> int:
        return self._balance

    def deposit(self, amount: int) -> int:
        self._balance += amount
        return self._balance

    def reset(self) -> None:
        self._balance = 0


class AccountManager(managers.BaseManager):
    pass


AccountManager.register("Account", Account, exposed=("balance", "deposit"))


@scene(
    "not-exposed",
    "Method not exposed: the error lists the ones that are",
    "calling a method left out of exposed=: NotExposedError names the exposed methods",
)
def not_exposed_scene(demo: Demo) -> bool:
    demo.say(
        """
        A registered type only serves the methods named in exposed=. Calling another one
        (from a hand-written proxy, or with _callmethod) fails in the manager; the stdlib
        reports a RemoteError holding a server-side traceback. procshare raises
        NotExposedError, an AttributeError (and still a RemoteError), that lists what is
        exposed.
        """
    )
    demo.code(
        """
        AccountManager.register("Account", Account, exposed=("balance", "deposit"))
        account = manager.Account()
        account._callmethod("reset")
        """
    )
    demo.flush()
    ok = False
    with AccountManager() as m:
        account = m.Account()
        try:
            account._callmethod("reset")
        except AttributeError as e:
            _show(demo, "procshare", e)
            ok = "balance, deposit" in str(e) and isinstance(e, procshare.RemoteError)
        demo.result("next call", f"account.balance() -> {account.balance()}", ok)
    demo.line()
    return ok
