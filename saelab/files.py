"""Crash-safe file writes, for everything in saelab that writes a file: a reader sees the old file or the new one,
never half of one.

A file is written to `<name>.tmp` in its own folder, flushed and fsynced, renamed over the target (`os.replace`,
atomic within one file system), and then the folder itself is fsynced, because the rename is durable only once
the folder's entry is on disk. A folder of files (a checkpoint) is written the same way, under a temporary name.

One rule for errors, in every helper here: an error that may mean the data is not on disk is raised (a failed
write, a failed fsync of the file, EIO or ENOSPC from a folder's fsync), after the temporary file is removed, so a
failed write leaves the target as it was and nothing half-written. The only errors passed over are the ones that
say this file system cannot fsync a folder at all (some network and FUSE file systems answer EINVAL, EBADF or
ENOTSUP; a folder one may write but not read answers EACCES): the rename has then happened and stands, as durable
as that file system makes it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"  # a file ending in it is never finished (resumable writers delete such files)

# errno values of os.open / os.fsync on a folder meaning "not possible here", not "the data may be lost"
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.EISDIR})


def tmp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `<name>.tmp` in the same folder."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder `path` (a rename into it, a new file) durable; see the module's error rule."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file written (and closed) by other code, such as a library's `save_file`, to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a binary file open at `<path>.tmp`, then fsync it, rename it to `path` and fsync the
    folder. Returns `path`."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when something above failed
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`text` as UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data) -> Path:
    """`data` as JSON indented by one space, with a final newline (saelab's manifests)."""
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_dir_atomic(path: str | Path, write: Callable[[Path], object], tmp: str | Path | None = None) -> Path:
    """Call `write(folder)` on a fresh, empty folder `tmp` (default `<path>.tmp`), fsync everything in it and the
    folder itself, then remove any old `path`, rename `tmp` to `path` and fsync the parent. Returns `path`.
    A failure while writing or fsyncing removes `tmp` and leaves `path` as it was; a process killed between the
    removal and the rename leaves only `tmp`, complete, for a resuming reader to rename into place."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a folder left by a write killed part way
    tmp.mkdir()
    try:
        write(tmp)
        for entry in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
            if entry.is_dir():
                fsync_dir(entry)
            else:
                fsync_file(entry)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename is durable only once the parent's entry is on disk
    return path


__all__ = ["TMP_SUFFIX", "tmp_path", "fsync_dir", "fsync_file", "write_atomic", "write_bytes_atomic",
           "write_text_atomic", "write_json_atomic", "write_dir_atomic"]
