"""`transport.files.replace_file`: a state file is replaced whole, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from procshare.transport.files import replace_file


def test_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "state")
    replace_file(path, b"old")
    replace_file(path, b"new" * 100_000, fsync=True)
    assert open(path, "rb").read() == b"new" * 100_000
    assert os.listdir(tmp_path) == ["state"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "state")
    replace_file(path, b"old")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        replace_file(path, b"new")
    monkeypatch.undo()
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["state"]


def test_a_symlink_in_the_way_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    (tmp_path / "state").symlink_to(target)
    replace_file(str(tmp_path / "state"), b"new")
    assert target.read_bytes() == b"keep"
    assert not (tmp_path / "state").is_symlink()
    assert (tmp_path / "state").read_bytes() == b"new"
