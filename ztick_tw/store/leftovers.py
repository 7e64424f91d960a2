"""Fold the files of an unfinished ztick compaction back into the logfile, at startup.

ztick compacts by renaming its logfile, whatever it is called, to the fixed name
``logfile.to_compress`` and carrying on in a fresh logfile.  A thread then writes the
last frame of every id of that file to ``logfile.compressed.tmp``, renames it to
``logfile.compressed`` and deletes ``logfile.to_compress``.  ztick never reads
``logfile.compressed`` back, so whatever the log held before the rename is missing
from the logfile after a ztick restart or a switch to ztick-tw.  These files are
written without fsync, so any of them may end in a torn frame.

ztick puts these files in its working directory (it opens that directory and renames
the logfile into it), which is the logfile's directory with ztick's default relative
``logfile_path``.  ztick-tw looks for them beside the logfile only: an operator moving
to ztick-tw copies them there with the logfile (see ``docs/upgrading-from-ztick.md``).

:func:`merge_ztick_leftovers` puts that state back in front of the logfile ``L``:

* ``logfile.compressed`` (``C``) is the compacted log of an earlier cycle (or of the
  current ``logfile.to_compress``, when ztick stopped between its last two steps);
* ``logfile.to_compress`` (``T``) is the log as it was when the current cycle began;
* ``logfile.compressed.tmp`` is an unfinished ``C``: never used, deleted.

The merged log is ``C + T + L`` (each leftover cut back to its last whole frame, ``L``
copied as it is, a torn tail included: loading the logfile cuts that off as usual).
When ``C`` was derived from ``T``, every id in ``C`` also has frames in ``T``, so
``C + T`` replays to the same state as ``T``; when ``C`` is older than ``T`` (ztick
stopped while compressing, after an earlier cycle had finished), ``C`` holds the state
from before ``T`` and the merge keeps it.  This is the same order as the manual merge
of ``docs/upgrading-from-ztick.md``.

The merged log is written to ``<logfile>.merge.tmp`` beside the logfile (mode 0600),
fsynced, renamed over the logfile, and the directory is fsynced; only then are the
leftovers deleted (and the directory fsynced again).  A crash at any point is safe:
before the rename the logfile is untouched and the next start does it all again; after
it, the leftovers that may remain are a part of the merged log, and replaying a part
of a log and then the whole log gives the state of the whole log (the last frame of
every id is in the whole log), so the next start merging them again changes nothing.

Only the logfile's own directory is looked at.  Leftovers found in the current
directory, when that is another one, are mentioned in the returned lines, never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass
from typing import Final

from ztick_tw.store.base import StoreError
from ztick_tw.store.scanning import scan

__all__ = [
    "COMPRESSED",
    "COMPRESSED_TMP",
    "MERGE_SUFFIX",
    "TO_COMPRESS",
    "ZTICK_LEFTOVERS",
    "merge_ztick_leftovers",
]

#: ztick's log of the compaction cycle in progress (the logfile, renamed).
TO_COMPRESS: Final = "logfile.to_compress"
#: ztick's compacted log of the last finished cycle.
COMPRESSED: Final = "logfile.compressed"
#: ztick's compacted log being written (never complete enough to use).
COMPRESSED_TMP: Final = "logfile.compressed.tmp"
#: Every name above; ztick uses these names whatever its logfile is called.
ZTICK_LEFTOVERS: Final = (TO_COMPRESS, COMPRESSED, COMPRESSED_TMP)

#: The merged log is written to ``<logfile><MERGE_SUFFIX>`` before it replaces the logfile.
MERGE_SUFFIX: Final = ".merge.tmp"

_COPY_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class _Leftover:
    """One leftover log to replay before the logfile, cut back to its last whole frame."""

    path: str
    data: bytes
    frames: int
    torn: str  # "" or a description of the torn tail that was cut off


def merge_ztick_leftovers(logfile_path: str) -> list[str]:
    """Merge ztick's compaction leftovers beside ``logfile_path`` into it; see the module.

    Returns one human-readable line per thing done or noticed (for the caller to log at
    warn); ``[]`` when there was nothing to do.  Raises ``StoreError`` naming the file
    (and the byte offset) when a leftover holds a corrupt frame, when the logfile is in
    use by another ztick-tw, or when reading or writing fails; the logfile and the
    leftovers are then as they were (at most a stale ``<logfile>.merge.tmp`` is left,
    which the next start replaces).
    """
    logfile = os.path.realpath(logfile_path)  # beside a symbolic link's target
    directory = os.path.dirname(logfile)
    own_name = os.path.basename(logfile)
    lines: list[str] = _elsewhere(directory)

    def beside(name: str) -> str | None:
        """The leftover ``name`` in the logfile's directory, if it exists (and is not L)."""
        if name == own_name:
            return None
        path = os.path.join(directory, name)
        return path if os.path.lexists(path) else None

    to_compress = beside(TO_COMPRESS)
    compressed = beside(COMPRESSED)
    compressed_tmp = beside(COMPRESSED_TMP)
    temp = logfile + MERGE_SUFFIX

    if to_compress is None and compressed is None:
        stale = [p for p in (compressed_tmp, temp) if p is not None and os.path.lexists(p)]
        for path in stale:
            problem = _unlink(path)
            if problem:
                lines.append(problem)
            elif path == temp:
                lines.append(f"removed {path}, left by an interrupted merge of ztick's files")
            else:
                lines.append(
                    f"removed {path}, an unfinished output of a ztick compaction"
                    " (its input is gone, so it was never needed)"
                )
        if stale:
            lines += _fsync_directory_after_removal(directory)
        return lines

    lock_fd = _lock_logfile(logfile)
    try:
        sources = [_read_leftover(p) for p in (compressed, to_compress) if p is not None]
        logfile_bytes = _write_merged(temp, sources, logfile)
        try:
            os.rename(temp, logfile)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StoreError(
                f"logfile {logfile}: cannot rename {temp} over it: {_describe(exc)};"
                " nothing was changed"
            ) from None
        # The leftovers may only go once the merged log is durably in place.
        _fsync_directory(directory)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)

    for source in sources:
        if source.torn:
            lines.append(f"{source.path}: {source.torn}")
    described = ", ".join(
        f"{source.path} ({source.frames} frame{'' if source.frames == 1 else 's'})"
        for source in sources
    )
    lines.append(
        f"merged the files of an unfinished ztick compaction into {logfile}: {described},"
        f" then the {logfile_bytes} bytes the logfile held"
    )
    removed: list[str] = []
    for leftover in (to_compress, compressed, compressed_tmp):
        if leftover is None:
            continue
        problem = _unlink(leftover)
        if not problem:
            removed.append(leftover)
        elif leftover == compressed_tmp:
            lines.append(problem)
        else:
            lines.append(problem + "; it is merged again at the next start, which is harmless")
    if removed:
        lines.append("removed " + ", ".join(removed))
        lines += _fsync_directory_after_removal(directory)
    return lines


def _elsewhere(directory: str) -> list[str]:
    """A note about ztick leftovers in the current directory, when that is another one."""
    try:
        cwd = os.getcwd()
    except OSError:
        return []
    if os.path.realpath(cwd) == os.path.realpath(directory):
        return []
    found = [name for name in (TO_COMPRESS, COMPRESSED) if os.path.lexists(name)]
    if not found:
        return []
    return [
        f"{', '.join(os.path.join(cwd, name) for name in found)}: left by a ztick compaction"
        f" in ztick's working directory; not merged (only {directory}, the logfile's"
        " directory, is looked at). Move them beside the logfile before starting if they"
        " belong to this log"
    ]


def _read_leftover(path: str) -> _Leftover:
    """Read and check one leftover; a torn tail is cut off, damage raises StoreError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise StoreError(
            f"ztick compaction file {path}: cannot read it: {_describe(exc)}"
        ) from None
    result = scan(data)
    for _ in result:
        pass
    problem = result.problem
    torn = ""
    if problem is not None:
        if problem.kind == "corrupt":
            raise StoreError(
                f"ztick compaction file {path}: corrupt frame at byte offset {problem.offset}:"
                f" {problem.reason}. It holds state that ztick had written before the"
                " logfile; repair it, or move it away to start without that state"
            )
        torn = (
            f"torn last frame at byte offset {problem.offset} ({problem.dropped} bytes:"
            f" {problem.reason}) cut off before merging"
        )
    return _Leftover(path, data[: result.good_end], result.count, torn)


def _lock_logfile(logfile: str) -> int | None:
    """Lock the existing logfile as LogfileStore does, so a running ztick-tw is not hit."""
    try:
        fd = os.open(logfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"logfile {logfile}: cannot open it: {_describe(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(
                f"logfile {logfile} is in use by another process"
                " (is another ztick-tw running on it?)"
            ) from None
        raise StoreError(f"logfile {logfile}: cannot lock it: {_describe(exc)}") from None
    return fd


def _write_merged(temp: str, sources: list[_Leftover], logfile: str) -> int:
    """Write ``sources`` then the logfile's bytes to ``temp`` and fsync it.

    Returns how many bytes came from the logfile.  On failure ``temp`` is removed and
    StoreError says what failed.
    """
    try:
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"logfile {logfile}: cannot create {temp}: {_describe(exc)}") from None
    copied = 0
    done = False
    try:
        os.fchmod(out, 0o600)  # O_CREAT's mode does not apply to a stale file reused here
        for source in sources:
            _write_all(out, source.data)
        try:
            src = os.open(logfile, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                while chunk := os.read(src, _COPY_CHUNK):
                    _write_all(out, chunk)
                    copied += len(chunk)
            finally:
                os.close(src)
        os.fsync(out)
        done = True
    except OSError as exc:
        raise StoreError(
            f"logfile {logfile}: writing the merge of ztick's compaction files to {temp}"
            f" failed: {_describe(exc)}; nothing was changed"
        ) from None
    finally:
        os.close(out)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    return copied


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[written:]


def _unlink(path: str) -> str:
    """Remove ``path``; "" on success (or if it is gone), else a line saying why not."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"cannot remove {path}: {_describe(exc)}"
    return ""


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"cannot open directory {directory}: {_describe(exc)}") from None
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StoreError(f"cannot sync directory {directory}: {_describe(exc)}") from None
    finally:
        os.close(fd)


def _fsync_directory_after_removal(directory: str) -> list[str]:
    """Sync removals; failing is harmless (a leftover coming back is merged again)."""
    try:
        _fsync_directory(directory)
    except StoreError as exc:
        return [f"{exc} after removing files; they may reappear after a power loss"]
    return []


def _describe(exc: OSError) -> str:
    if exc.errno is not None:
        return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return str(exc)
