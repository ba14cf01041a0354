"""Small state files, replaced whole.

Owns: `replace_file`, the one way procshare writes a file that a reader (or a
later process, after a crash) must find either as it was or as it is now: the
supervisor's state, the holders of unnamed durable objects, a Ray durable
object's snapshot.

Rules it keeps:
- The new contents go to a temporary file of their own in the same directory
  (`mkstemp`: mode 0600, created exclusively, so never through a symlink),
  which is renamed over the old file; a reader sees the old file or the new
  one, never a part.
- `fsync=True` flushes the file to the disk before the rename (a power loss
  then keeps the old or the new contents too).
- On any failure the temporary file is removed and the error raised: the old
  file is left as it was.
"""

from __future__ import annotations

import os
import tempfile

__all__ = ["replace_file"]


def replace_file(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Make `data` the contents of `path` at once (see the module docstring);
    OSError if it cannot be written."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        try:
            with memoryview(data) as view:
                while view:
                    view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
