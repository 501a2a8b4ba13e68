"""saelab.files: an atomic write leaves the new file or the old one (never a part, never a temporary file), and
fsync errors follow one rule: passed over when they say a folder cannot be fsynced here, raised when data may be
lost."""

from __future__ import annotations

import errno
import json
import os

import pytest

from saelab import files


def test_writes_text_json_and_bytes_exactly(tmp_path):
    files.write_text_atomic(tmp_path / "a.html", "<p>ünïcode</p>")
    assert (tmp_path / "a.html").read_bytes() == "<p>ünïcode</p>".encode("utf-8")
    data = {"b": [1, 2.5, None], "a": {"x": "y"}}
    files.write_json_atomic(tmp_path / "m.json", data)
    assert (tmp_path / "m.json").read_text() == '{\n "b": [\n  1,\n  2.5,\n  null\n ],\n "a": {\n  "x": "y"\n }\n}\n'
    assert json.loads((tmp_path / "m.json").read_text()) == data
    files.write_bytes_atomic(tmp_path / "b.bin", bytes(range(256)))
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.bin", "m.json"]  # no temporary files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "scores.json"
    target.write_text("old")

    def half_then_fail(f):
        f.write(b"new, but only half of i")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def _eio(fd):
    raise OSError(errno.EIO, "Input/output error")


def test_a_failed_fsync_of_the_data_is_raised_and_the_target_kept(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", _eio)
    with pytest.raises(OSError, match="Input/output"):
        files.write_text_atomic(target, "new")
    assert target.read_text() == "old" and not files.tmp_path(target).exists()


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBADF, errno.ENOTSUP])
def test_a_folder_that_cannot_be_fsynced_is_passed_over(tmp_path, monkeypatch, code):
    real = os.fsync

    def no_dir_fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):  # (Linux) the open file is a folder
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", no_dir_fsync)
    files.fsync_dir(tmp_path)  # no error
    files.write_text_atomic(tmp_path / "y.txt", "done")
    assert (tmp_path / "y.txt").read_text() == "done"


def test_an_io_error_from_a_folder_fsync_is_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _eio)
    with pytest.raises(OSError, match="Input/output"):
        files.fsync_dir(tmp_path)


def test_a_folder_the_process_may_not_open_is_passed_over(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_dirs(path, flags, *a):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse_dirs)
    files.fsync_dir(tmp_path)


def test_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.fsync_dir(tmp_path / "missing")


def test_a_folder_is_written_whole_in_place_of_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "partial"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old checkpoint")
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # (Linux) which file or folder was fsynced
        real(fd)

    def write(folder):
        (folder / "weights.bin").write_bytes(bytes(range(256)))
        (folder / "sub").mkdir()
        (folder / "sub" / "step.json").write_text('{"step": 3}')

    monkeypatch.setattr(os, "fsync", record)
    assert files.write_dir_atomic(target, write) == target
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/step.json", "weights.bin"]
    assert (target / "weights.bin").read_bytes() == bytes(range(256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]  # no temporary folder left
    tmp = str(files.tmp_path(target))
    # every file and folder fsynced under the temporary name before the rename, then the parent after it
    assert synced == [f"{tmp}/weights.bin", f"{tmp}/sub/step.json", f"{tmp}/sub", tmp, str(tmp_path)]


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "step-00000010"
    target.mkdir()
    (target / "state.json").write_text("old")

    def half_then_fail(folder):
        (folder / "state.json").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.write_dir_atomic(target, half_then_fail, tmp=tmp_path / ".tmp-step-00000010")
    assert (target / "state.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]
