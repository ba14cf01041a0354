"""procshare's transport: the only code that touches sockets.

`addresses` says what an address means; `channel` moves frames (parsed by
`wire.frames.FrameReader`) and drives the handshake (`wire.handshake`)."""

import sys

if sys.platform == "win32":  # pragma: no cover
    raise ImportError("procshare supports POSIX systems (Linux, macOS) only")
