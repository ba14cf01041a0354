"""Pipelined calls: many requests in flight on one connection, each answered in a Future.

Owns: `Pipe` (one per session and thread: a connection of its own, a reader
thread that resolves futures by request id), `CallFuture`, and the public
wrappers `async_(proxy)` and `oneway(proxy)`.

Rules it keeps:
- Requests leave in the order they are made, on one connection, so the
  manager runs the calls of a thread in that order (per proxy, and across
  proxies of that manager).  A request goes out at once if the socket takes
  it; otherwise a writer thread sends it with the others that queued up
  meanwhile (many calls, few writes).  The caller never blocks on the socket,
  and the reader thread never writes, so a full socket cannot deadlock them.
- A request whose arguments cannot be serialized raises at once, in the
  caller, and nothing is sent.
- Deadlines apply as to a plain call (the call's own, `procshare.timeout()`,
  the proxy's, the manager's).  At the deadline the pipe settles the call as
  a plain call does (a cancel round trip): a call that happened delivers its
  result; otherwise the future gets `CallTimeout`.
- `CallFuture.cancel()` cancels the call in the manager, by request id, and
  returns once the manager has it (one round trip): a blocked get or acquire
  then takes nothing, even from a put made right after.
- A oneway call gets no reply and no future; its errors are only logged by
  the manager.
- If the connection breaks, every outstanding future gets `ManagerCrashed`;
  when the manager restarted, `ObjectLost`, except the calls on durable
  objects: those are sent again, in their order and before any later call of
  the thread, on a new connection (`successor`), under the key of their
  first sending (`#RETRY`), with what is left of their deadlines, so that
  each takes effect exactly once.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures._base as _futures_base
import functools
import heapq
import logging
import threading
import time
from typing import Any

from ..transport.channel import FrameTail
from ..wire.frames import NO_DEADLINE, encode_frame, pack_frame
from ..wire.kinds import Kind
from ..wire.records import DURABLE_PREFIX
from .loans import mark as loan_mark
from .replies import call_timeout
from .scope import UNSET
from .session import check_size, unsendable

__all__ = ["async_", "oneway", "CallFuture", "Pipe"]

log = logging.getLogger("procshare.client")

_PENDING = _futures_base.PENDING
_RUNNING = _futures_base.RUNNING
_FINISHED = _futures_base.FINISHED
_CANCELLED_STATES = (_futures_base.CANCELLED, _futures_base.CANCELLED_AND_NOTIFIED)
#: taken to make a future's own Condition, and to settle one that has none
_MAKING = threading.Lock()
_CALL = Kind.CALL
_RETURN = Kind.RETURN
_STOPPING = Kind.STOPPING
_monotonic = time.monotonic
#: the longest a thread's next call waits for a broken pipe's re-sends to be on their
#: way (they wait for a restarting manager: session.RECONNECT, 5 s, at most)
_HANDOVER_WAIT = 15.0
#: the most replies the reader settles before it wakes the pipe's waiters
_BATCH = 32


class CallFuture(concurrent.futures.Future):
    """The future of one pipelined call.

    A `concurrent.futures.Future` in every way.  Creating a Condition per call
    cost about as much as the rest of a submit, so a future makes its own
    (`_condition`, what Future's methods, `wait()` and `as_completed()` lock)
    only when something asks for it; the reader settles a future that has
    none under `_MAKING`, the lock that making one takes.  Its lists of
    waiters and of done callbacks, which only `Future.__init__` assigns, are
    made on first use too.  This class's own
    `result()` and `exception()` wait on the pipe's Condition (`settled`),
    which the reader wakes after settling a future, never while it holds a
    future's: so no lock order exists between them, and one wakeup may be for
    another future of the pipe (they wait in a loop).
    """

    # what most futures keep as it is: read from the class until set
    _result: Any = None
    _exception: BaseException | None = None
    _cond: threading.Condition | None = None    # made on demand: see `_condition`
    _deadline: float | None = None
    #: a call on a durable object: its request as first serialized (body,
    #: buffers), so that a re-send carries what was sent, whatever the caller
    #: did to its arguments since; dropped once the future is settled
    _resend: tuple | None = None
    _first: tuple | None = None     # a re-send: (connection, request) of the first
    _replaced_by: CallFuture | None = None

    def __init__(self, pipe: Pipe, rid: int, proxy: Any, meth: str,
                 timeout: float | None) -> None:
        # the attributes Future.__init__ sets, but the Condition
        self._state = _PENDING
        self._settled = pipe.settled
        self._pipe = pipe
        self._rid = rid
        self._proxy = proxy
        self._meth = meth
        self._timeout = timeout

    @property
    def _waiters(self) -> list:     # type: ignore[override]
        """`wait()`'s and `as_completed()`'s waiters (made on first use)."""
        d = self.__dict__
        w = d.get("_waiters_")
        if w is None:
            w = d.setdefault("_waiters_", [])     # (atomic: one list, whoever asks)
        return w

    @property
    def _done_callbacks(self) -> list:  # type: ignore[override]
        """The callbacks of `add_done_callback()` (made on first use)."""
        d = self.__dict__
        c = d.get("_callbacks_")
        if c is None:
            c = d.setdefault("_callbacks_", [])
        return c

    @property
    def _condition(self) -> threading.Condition:    # type: ignore[override]
        """This future's own Condition, made on first use."""
        cond = self._cond
        if cond is None:
            with _MAKING:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def _settle(self, value: Any, failed: bool) -> None:
        """Future.set_result / set_exception, making no Condition for it."""
        cond = self._cond
        if cond is None:
            with _MAKING:
                cond = self._cond
                if cond is None:        # nobody holds or waits on one: none exists
                    self._finish(value, failed)
        if cond is not None:
            with cond:
                self._finish(value, failed)
                if cond._waiters:
                    cond.notify_all()
        self._wake_pipe()
        if self._done_callbacks:
            self._invoke_callbacks()

    def _finish(self, value: Any, failed: bool) -> None:
        """(the future's lock held) Record the outcome; tell `wait()`'s waiters."""
        if self._state != _PENDING and self._state != _RUNNING:
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
        if failed:
            self._exception = value
        else:
            self._result = value
        self._state = _FINISHED
        for waiter in self._waiters:
            if failed:
                waiter.add_exception(self)
            else:
                waiter.add_result(self)

    def _wake_pipe(self) -> None:
        """Wake this pipe's `result()` / `exception()` waiters (its state is set)."""
        settled = self._settled
        with settled:
            if settled._waiters:
                settled.notify_all()

    def set_result(self, result: Any) -> None:
        self._settle(result, False)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(exception, True)

    def _wait_settled(self, timeout: float | None) -> None:
        """(the pipe's Condition held) Wait until settled: CancelledError if
        cancelled, TimeoutError if `timeout` passes first."""
        end = None
        while True:
            state = self._state
            if state == _FINISHED:
                return
            if state in _CANCELLED_STATES:
                raise concurrent.futures.CancelledError()
            if timeout is None:
                self._settled.wait()
                continue
            if end is None:
                end = _monotonic() + timeout
            left = end - _monotonic()
            if left <= 0:
                raise concurrent.futures.TimeoutError()
            self._settled.wait(left)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED and self._exception is None:
            return self._result         # settled already: no lock needed to read it
        try:
            with self._settled:
                self._wait_settled(timeout)
                if self._exception is not None:
                    raise self._exception
                return self._result
        finally:
            self = None     # noqa: PLW0642 - as Future.result: no cycle via the traceback

    def exception(self, timeout: float | None = None) -> BaseException | None:
        with self._settled:
            self._wait_settled(timeout)
            return self._exception

    def cancel(self) -> bool:
        """Cancel the call here and in the manager (a blocked call takes nothing)."""
        if not super().cancel():
            return False
        self._wake_pipe()
        then = self._replaced_by
        if then is not None:
            then.cancel()
        else:
            self._pipe.abandon(self._rid)
        return True


class Pipe:
    """Pipelined calls of one thread to one manager."""

    def __init__(self, session: Any, thread: threading.Thread | None = None) -> None:
        self.session = session
        #: whose calls these are (the manager knows lock owners by thread)
        self.thread = thread or threading.current_thread()
        # a connection of its own, whose thread does not sleep for each reply
        self.conn = session._open("call", self.thread, waits=False)
        self.ch = self.conn.ch
        self.ser = self.conn.ser
        self.none_body = self.conn.none_body    # the common reply, read without loads
        self.limits = self.conn.limits          # what the manager accepts
        self.lock = threading.Lock()            # everything below; never held for I/O
        self.wake = threading.Condition(self.lock)
        #: what this pipe's futures' result() and exception() wait on (see CallFuture)
        self.settled = threading.Condition()
        self.rid = 0
        self.futures: dict[int, CallFuture] = {}
        self.out: list[Any] = []                # requests the writer has yet to send
        self.writing = False
        self.idle_writer = False                # the writer waits for work: notify it
        self.deadlines: list[tuple[float, int]] = []   # heap of (deadline, rid)
        self.broken: BaseException | None = None
        #: set once this broken pipe's re-sends are on a new one (None: none)
        self.successor: Pipe | None = None
        self.closing = False
        self.handed_over = threading.Event()
        for target, name in ((self._read, "reader"), (self._write, "writer")):
            threading.Thread(target=target, daemon=True, name=f"procshare-pipe-{name}").start()

    # -- sending ---------------------------------------------------------------------
    def submit(self, proxy: Any, meth: str, args: tuple, kwds: dict,
               timeout: float | None, want_reply: bool = True,
               resend_of: CallFuture | None = None) -> CallFuture | None:
        since = loan_mark()
        try:
            body, bufs = self.ser.dumps_call(proxy._id, meth, args, kwds)  # nothing sent if it fails
        except Exception as e:
            raise unsendable(e, since, self.ser, proxy._id, meth, args, kwds,
                             proxy._token.typeid) from None
        limits = self.limits
        if bufs or len(body) > limits.max_body:     # (nothing sent if this raises)
            check_size(limits, body, bufs, since, self.ser, proxy._id, meth, args, kwds,
                       self.session.address, proxy._token.typeid)
        budget = NO_DEADLINE if timeout is None else timeout
        session = self.session
        # (ordered after this process's decrefs: `Session.sync_frame`; a pipe
        # has one submitting thread, so this needs no lock of the pipe's)
        sync = session.sync_frame(self.conn) if self.conn.synced != session.drops else b""
        with self.lock:
            if self.broken is not None:
                raise self.session.crashed(self.broken)
            rid = 0
            fut = None
            if want_reply:
                rid = self.rid = self.rid + 1
                fut = self.futures[rid] = CallFuture(self, rid, proxy, meth, timeout)
                if timeout is not None:
                    fut._deadline = _monotonic() + timeout
                    heapq.heappush(self.deadlines, (fut._deadline, rid))
                if resend_of is not None:   # set before anything is sent: see _send_again
                    fut._meth, fut._timeout = resend_of._meth, resend_of._timeout
                    fut._resend, fut._first = resend_of._resend, resend_of._first
                elif proxy._id.startswith(DURABLE_PREFIX):
                    fut._resend = (body, [bytes(memoryview(b).cast("B")) for b in bufs])
                    self.ch.slow_replies()  # its reply waits for a commit
            if bufs:
                if sync:
                    self.out.append(sync)
                self.out.append(encode_frame(_CALL, rid, body, bufs, budget, self.limits))
            else:
                frame = sync + pack_frame(_CALL, rid, body, budget)
                if len(self.futures) <= 1 and not self.out and not self.writing:
                    # an idle pipe: send it now (lowest latency), never blocking
                    # here; the writer thread finishes what does not fit.  The
                    # stream is between frames: releases of slots may go first
                    frame = self.ch.notice_prefix() + frame
                    try:
                        sent = self.ch.send_nowait(frame)
                    except OSError as e:
                        if isinstance(e, ConnectionError):  # the peer is gone: not sent
                            self.ch.unsent(frame, 0)        # (its notices are owed again)
                        # this call fails; calls in flight are the reader's to settle
                        # (it breaks the pipe at EOF, after reading what came)
                        if fut is not None:
                            self.futures.pop(rid, None)
                        raise self.session.crashed(e) from None
                    if sent == len(frame):
                        return fut
                    frame = FrameTail(frame[sent:])     # the rest of a frame already begun
                # calls in flight: queue it; the writer sends the queue in one write
                self.out.append(frame)
            if self.idle_writer:
                self.idle_writer = False
                self.wake.notify()
        return fut

    def _write(self) -> None:
        """The writer thread: sends what `submit` queued, many requests per write."""
        ch = self.ch
        while True:
            with self.lock:
                while not self.out and self.broken is None:
                    self.idle_writer = True
                    self.wake.wait()
                self.idle_writer = False
                if self.broken is not None:
                    return
                batch, self.out = self.out, []
                self.writing = True
            try:
                small: list[bytes] = []
                for item in batch:
                    if isinstance(item, bytes):
                        small.append(item)
                        continue
                    if small:
                        ch.send_frames(b"".join(small), type(small[0]) is not FrameTail)
                        small = []
                    ch.send(item)               # a frame with out-of-band buffers
                if small:
                    ch.send_frames(b"".join(small), type(small[0]) is not FrameTail)
            except OSError as e:
                # the peer is gone, but replies it sent may still be waiting to be
                # read: the reader reads them, then breaks the pipe at EOF (a break
                # here would send again calls whose replies are on their way)
                log.debug("pipelined connection to %r: a write failed: %r",
                          self.session.address, e)
                return
            finally:
                with self.lock:
                    self.writing = False

    # -- receiving -------------------------------------------------------------------
    def _read(self) -> None:
        ch = self.ch
        buffered = ch.buffered_frame
        deliver = self._deliver
        settled = self.settled
        try:
            while True:
                due = None
                if self.deadlines:
                    with self.lock:
                        due = self.deadlines[0][0] if self.deadlines else None
                try:
                    kind, rid, _b, body, bufs = ch.recv_frame(due)
                except TimeoutError:
                    self._expire()
                    continue
                # the replies that came in the same receive: settled without a
                # receive each, and their waiters woken once (at most _BATCH
                # replies a wakeup, so the first of them waits little; woken
                # too if a frame after them breaks the connection)
                try:
                    deliver(kind, rid, body, bufs)
                    for _ in range(_BATCH - 1):
                        frame = buffered()
                        if frame is None:
                            break
                        kind, rid, _b, body, bufs = frame
                        deliver(kind, rid, body, bufs)
                finally:
                    with settled:
                        if settled._waiters:
                            settled.notify_all()
        except (EOFError, OSError) as e:
            self._break(e)
        except Exception as e:       # a frame error: the connection is unusable
            log.warning("pipelined connection to %r failed: %r", self.session.address, e)
            self._break(e)

    def _deliver(self, kind: int, rid: int, body: Any, bufs: Any) -> None:
        """Settle the future of one reply.  The common one (a result, for a
        future nobody holds a Condition of, so no waiter of `wait()` and no
        callback) is settled here and its `result()` waiter is left for the
        reader's next wakeup of the pipe (`_read`); any other goes through
        `CallFuture._settle`, which wakes its waiters itself."""
        fut = self.futures.pop(rid, None)     # atomic: no lock on the reader's path
        if fut is None:
            if kind == _STOPPING:   # the manager stopped for good: the pipe ends
                raise self.session.on_stopping(body)
            return          # cancelled, or settled already
        try:
            if kind == _RETURN:
                value = None if body == self.none_body else self.ser.loads(body, bufs)
            else:
                value = fut._proxy._procshare_outcome(kind, self.ser.loads(body, bufs), fut._meth,
                                            fut._timeout)
        except BaseException as e:
            try:
                _settle_future(fut, e, True)
            finally:
                fut = None  # e's traceback holds this frame: no cycle through the future
            return
        with _MAKING:       # (what making a future's Condition takes: see CallFuture)
            if fut._cond is None and fut._state == _PENDING:
                fut._resend = None
                fut._result = value
                fut._state = _FINISHED
                return
        _settle_future(fut, value, False)

    def _expire(self) -> None:
        """Settle the calls whose deadline passed (in a thread of their own:
        settling waits for the manager's answer)."""
        now = _monotonic()
        expired = []
        with self.lock:
            while self.deadlines and self.deadlines[0][0] <= now:
                _d, rid = heapq.heappop(self.deadlines)
                if rid in self.futures:
                    expired.append(rid)
        for rid in expired:
            threading.Thread(target=self._settle, args=(rid,), daemon=True).start()

    def _settle(self, rid: int) -> None:
        try:
            state = self.session.control_call("cancel", self.conn.no, rid, timeout=2.0)
        except Exception:
            state = None
        if state in ("done", "cancelled", "not started"):
            return      # its reply is coming, and resolves the future
        with self.lock:
            fut = self.futures.pop(rid, None)
        if fut is not None:
            _settle_future(fut, call_timeout(fut._proxy, fut._meth, fut._timeout, False), True)

    def abandon(self, rid: int) -> None:
        """A future was cancelled: cancel its call in the manager, and wait for
        the manager to confirm (one round trip), so that what the caller does
        next cannot be overtaken by the call it gave up."""
        with self.lock:
            self.futures.pop(rid, None)
        try:
            self.session.control_call("cancel", self.conn.no, rid, timeout=1.0)
        except Exception as e:
            log.debug("cancel of pipelined request %d not delivered: %r", rid, e)

    def _break(self, cause: BaseException) -> None:
        with self.lock:
            first = self.broken is None
            futures = self._break_locked(cause)
        with self.settled:      # (result() waiters of futures settled before the break)
            self.settled.notify_all()
        if not first:
            return          # the first break hands over (reader and writer both see it)
        try:
            self.conn.close()
            if not futures:
                return
            session = self.session
            try:
                restarted = not self.closing and not getattr(session, "closed", False) and (
                    self.conn.epoch != session.epoch or session.recover(self.conn.epoch))
            except Exception as e:      # reconnecting failed some other way: say so
                for fut in futures:
                    _settle_future(fut, e, True)
                return
            if not restarted:
                error = session.crashed(cause)
                for fut in futures:
                    _settle_future(fut, error, True)
                return
            again = sorted((f for f in futures if f._resend is not None), key=lambda f: f._rid)
            for fut in futures:
                if fut._resend is None:
                    _settle_future(fut, fut._proxy._procshare_lost(fut._meth), True)
            if again:
                self._send_again(again)
        finally:
            self.handed_over.set()

    def _send_again(self, futures: list[CallFuture]) -> None:
        """Calls on durable objects that were in flight when the manager
        crashed: send them again, in order, on a new pipe that this thread's
        later calls will use too (published once they are all queued)."""
        try:
            pipe = Pipe(self.session, self.thread)
            self.session.pipes.add(pipe)
        except Exception as e:
            for fut in futures:
                _settle_future(fut, e, True)
            return
        first_pipe = pipe
        for fut in futures:
            if fut.done() or fut._resend is None:
                continue        # cancelled meanwhile
            left = None if fut._deadline is None else fut._deadline - _monotonic()
            if left is not None and left <= 0:
                _settle_future(fut, call_timeout(fut._proxy, fut._meth, fut._timeout, False),
                               True)
                continue
            if fut._first is None:
                fut._first = (self.conn.no, fut._rid)      # a re-send keeps the first key
            try:
                _oid, meth, args, kwds = self.ser.loads(*fut._resend)
            except Exception as e:
                _settle_future(fut, e, True)
                continue
            new = None
            while new is None:
                try:
                    new = pipe.submit(fut._proxy, "#RETRY", (*fut._first, meth, args, kwds), {},
                                      left, resend_of=fut)
                except Exception as e:
                    # the new pipe broke too (another crash): once it has sent its own
                    # calls again, the rest follow them on its successor
                    nxt = None
                    if pipe.broken is not None and pipe.handed_over.wait(_HANDOVER_WAIT):
                        nxt = pipe.successor
                    if nxt is None:
                        _settle_future(fut, e, True)
                        break
                    pipe = nxt
            if new is None:
                continue
            fut._replaced_by = new
            new.add_done_callback(functools.partial(_pass_on, fut))
            if fut.cancelled():         # cancelled while it was being sent again
                new.cancel()
        self.successor = first_pipe

    def _break_locked(self, cause: BaseException) -> list[CallFuture]:
        """(lock held) The connection is unusable: stop the threads; the
        outstanding futures are returned, to be failed outside the lock."""
        if self.broken is None:
            self.broken = cause
        futures = list(self.futures.values())
        self.futures.clear()
        self.out.clear()
        self.wake.notify_all()
        return futures

    def close(self) -> None:
        self.closing = True     # not a crash: nothing is sent again
        self._break(EOFError("the session was closed"))


def _settle_future(fut: CallFuture, value: Any, failed: bool) -> None:
    """Complete `fut` unless it was cancelled (set_* refuse a cancelled one)."""
    fut._resend = None      # nothing is sent again once it is settled
    try:
        if failed:
            fut.set_exception(value)
        else:
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def _pass_on(old: CallFuture, new: CallFuture) -> None:
    """A re-sent call finished: its first future gets the outcome."""
    if new.cancelled():
        old.cancel()
    elif new.exception() is not None:
        _settle_future(old, new.exception(), True)
    else:
        _settle_future(old, new.result(), False)


def _pipe(proxy: Any) -> Pipe:
    """This thread's pipe to the proxy's manager (opened on first use; after
    a break, the one that carries the broken pipe's re-sent calls)."""
    tls = proxy._procshare_session.tls
    pipe = getattr(tls, "pipe", None)
    if pipe is not None and pipe.broken is None:
        return pipe
    while pipe is not None and pipe.broken is not None:
        # calls re-sent after a restart go first: wait until they are on their way
        if not pipe.handed_over.wait(_HANDOVER_WAIT):
            raise proxy._procshare_session.crashed(pipe.broken)
        pipe = pipe.successor
    if pipe is None:
        pipe = Pipe(proxy._procshare_session)
        proxy._procshare_session.pipes.add(pipe)
    tls.pipe = pipe
    return pipe


class _Calls:
    """`async_(proxy).method(...)`: each method call returns a Future."""

    __slots__ = ("_proxy", "_timeout", "_want_reply", "__dict__")

    def __init__(self, proxy: Any, timeout: Any, want_reply: bool) -> None:
        if not getattr(type(proxy), "_procshare_proxy_", False):
            raise TypeError(f"async_() and oneway() take a procshare proxy, not "
                            f"{type(proxy).__name__}")
        self._proxy = proxy
        self._timeout = timeout
        self._want_reply = want_reply

    def __getattr__(self, name: str) -> Any:
        proxy = self._proxy

        timeout_, want_reply = self._timeout, self._want_reply

        submit = getattr(proxy._procshare_session, "submit_pipelined", None)

        def call(*args: Any, **kwds: Any) -> Any:
            timeout = proxy._procshare_deadline_for(timeout_)
            if submit is not None:      # a session with pipelining of its own (Ray)
                return submit(proxy, name, args, kwds, timeout, want_reply)
            return _pipe(proxy).submit(proxy, name, args, kwds, timeout, want_reply)
        call.__name__ = name
        self.__dict__[name] = call      # the next lookup finds it without __getattr__
        return call

    def __repr__(self) -> str:
        kind = "async_" if self._want_reply else "oneway"
        return f"{kind}({self._proxy!r})"


def async_(proxy: Any, timeout: Any = UNSET) -> Any:
    """`async_(proxy).method(*args, **kwds)` sends the call at once and returns a
    `concurrent.futures.Future` of its result; many can be in flight.

    `timeout=` (seconds, or None for no limit) bounds each call made through
    it; by default the scoped, per-proxy and per-manager timeouts apply as to
    a plain call.
    """
    return _Calls(proxy, timeout, True)


def oneway(proxy: Any) -> Any:
    """`oneway(proxy).method(*args, **kwds)` sends the call and returns None at
    once: no reply is sent back, so its result and errors are not seen."""
    return _Calls(proxy, UNSET, False)
