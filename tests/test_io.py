"""Atomic writes: content replaced whole, and files as readable as any file the user creates."""

from __future__ import annotations

import os
import stat

from vlmsae_utils.io import atomic_write_bytes, atomic_write_json, read_json


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    written = atomic_write_bytes(tmp_path / "atomic.bin", b"data")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert written.read_bytes() == b"data"


def test_json_round_trip_and_no_temp_files_left(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "a.json", {"c": 3})
    assert read_json(tmp_path / "a.json") == {"c": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
