"""Atomic writes: an interrupted write leaves the previous file and no temporary behind."""

import pytest

from mapa._io import atomic_open


def test_atomic_open_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with atomic_open(path, "w") as fh:
        fh.write("first")
    with atomic_open(path, "w") as fh:
        fh.write("second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_atomic_open_keeps_old_content_when_interrupted(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path, "wb") as fh:
            fh.write(b"half of the new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
