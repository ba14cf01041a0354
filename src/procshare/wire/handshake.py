"""The authentication handshake, sans-IO: a byte-level state machine for each end.

Owns: the bytes of the mutual HMAC-SHA256 challenge that opens every
connection, and the texts of its failures.  The transport moves the bytes:
it sends what a step returns and feeds back exactly `need` bytes.

Rules it keeps:
- Authenticate before deserializing anything: every message of the handshake
  is fixed-size raw bytes; nothing is unpickled until both sides are proven.
- Both ends prove knowledge of the key: the server checks the client's digest
  of its challenge, then answers the client's own challenge.
- A failed check says which side refused and the usual causes; it never
  prints the key.

The exchange (C = client, S = server):
    S -> C  MAGIC + server challenge                    (SERVER_HELLO bytes)
    C -> S  MAGIC + HMAC(key, server challenge) + client challenge
    S -> C  "OK" + HMAC(key, client challenge)   or  "NO" + zeros
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

from ..errors import AuthenticationError

__all__ = ["ServerHandshake", "ClientHandshake", "MAGIC"]

MAGIC = b"PSHR1\x00"
_CHALLENGE = 32
_DIGEST = hashlib.sha256().digest_size
_OK = b"OK"
_NO = b"NO"


def _digest(authkey: bytes, challenge: bytes) -> bytes:
    return hmac.new(authkey, challenge, hashlib.sha256).digest()


def auth_hint() -> str:
    return ("This process and the manager do not share the authkey. Usual "
            "causes: (1) the manager was given authkey=... and this process passes a "
            "different one, or none (then it uses its current_process().authkey); (2) this "
            "process was not started by multiprocessing from the process that created the "
            "manager (a separate script, a subprocess, another machine), so its default "
            "authkey is a different random key: pass the same authkey= (bytes) on both "
            "ends; (3) another manager, with its own key, now listens at this address.")


class ServerHandshake:
    """The manager's end.  `start()` gives the bytes to send; then feed the
    client's `need` bytes to `receive`, send what it returns, and the client
    is authenticated if it did not raise."""

    need = len(MAGIC) + _DIGEST + _CHALLENGE

    def __init__(self, authkey: bytes, peer: Any = None) -> None:
        self._key = bytes(authkey)
        self._challenge = secrets.token_bytes(_CHALLENGE)
        self.peer = peer
        self.done = False

    def start(self) -> bytes:
        return MAGIC + self._challenge

    def receive(self, reply: bytes) -> tuple[bytes, AuthenticationError | None]:
        """`(bytes to send, error or None)`: send the bytes even on an error,
        so the client learns that it was refused, then raise the error."""
        if len(reply) != self.need or reply[:len(MAGIC)] != MAGIC:
            return b"", AuthenticationError(
                f"a peer ({self.peer!r}) connected that does not speak the procshare "
                f"protocol (first bytes {bytes(reply[:8])!r}); connection closed")
        digest = reply[len(MAGIC):len(MAGIC) + _DIGEST]
        if not hmac.compare_digest(digest, _digest(self._key, self._challenge)):
            return _NO + bytes(_DIGEST), AuthenticationError(
                "the manager rejected a client's authkey (HMAC digest mismatch: the client "
                "uses a different authkey); connection refused, and the client was told so")
        self.done = True
        return _OK + _digest(self._key, reply[len(MAGIC) + _DIGEST:]), None


class ClientHandshake:
    """The client's end: feed the server's first `need` bytes to `challenge`,
    send what it returns, then feed the server's answer (`answer_size`
    bytes, or fewer if the server closed) to `answer`."""

    need = len(MAGIC) + _CHALLENGE
    answer_size = len(_OK) + _DIGEST

    def __init__(self, authkey: bytes, address: Any) -> None:
        self._key = bytes(authkey)
        self._mine = secrets.token_bytes(_CHALLENGE)
        self.address = address
        self.done = False

    def challenge(self, head: bytes) -> bytes:
        if head[:len(MAGIC)] != MAGIC:
            raise AuthenticationError(
                f"the server at {self.address!r} is not a procshare manager (it sent "
                f"{bytes(head[:8])!r}). A multiprocessing.managers server cannot be reached "
                "with procshare, or the other way round: use the same library on both ends.")
        return MAGIC + _digest(self._key, head[len(MAGIC):]) + self._mine

    def answer(self, answer: bytes) -> None:
        if answer[:2] != _OK or len(answer) != self.answer_size:
            raise AuthenticationError(
                f"the manager at {self.address!r} rejected the authkey of this process (pid "
                f"{os.getpid()}): the manager side refused the connection (HMAC digest "
                "mismatch). " + auth_hint(), address=self.address, rejected_by="manager")
        if not hmac.compare_digest(answer[2:], _digest(self._key, self._mine)):
            raise AuthenticationError(
                f"this process (pid {os.getpid()}) rejected the server at {self.address!r}: "
                "it accepted this process's digest but could not prove that it knows the "
                "authkey itself. Something other than the manager may be listening on that "
                "address (check the address), or it is not a procshare manager.",
                address=self.address, rejected_by="client")
        self.done = True

    def no_answer(self) -> AuthenticationError:
        """The error for a server that closed or said nothing before authenticating."""
        return AuthenticationError(
            f"the server at {self.address!r} closed the connection or sent nothing before "
            "authenticating; is it a procshare manager?", address=self.address,
            no_answer=True)
