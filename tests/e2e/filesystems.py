"""Small file systems made by a test: a tmpfs that fills up, read-only mounts.

``Mounts`` mounts file systems under the test's own directory and unmounts every one of
them in ``unmount_all`` (a finalizer), newest first, lazily (``umount -l``) when a plain
unmount fails, so a failing test never leaves a mount behind.

Mounting needs root (``CAP_SYS_ADMIN``).  Where it is refused, ``MountRefused`` is
raised; the test module turns that into a skip, or a failure when ``CI=true`` (CI runs
as root, so a refusal there is a broken setup, not a reason to test less).

``fill`` writes a filler file until the file system answers ``ENOSPC``: on a tmpfs,
whose space is counted in whole pages, that leaves no free page at all.  A file that
already ends inside a page can still grow into the rest of that page; the tests use
up that slack through the daemon itself before they count on a write failing.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["MountRefused", "Mounts", "fill", "free_bytes"]

#: Seconds a mount/umount command may take before the test fails.
COMMAND_TIMEOUT = 30.0


class MountRefused(Exception):
    """Mounting is refused to this process (not root, no CAP_SYS_ADMIN)."""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )


def _is_mount_point(path: Path) -> bool:
    """Whether ``path`` is listed as a mount point in ``/proc/self/mounts``."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            # Spaces and the like are octal-escaped in the mount point field.
            if len(fields) > 1 and fields[1].encode().decode("unicode_escape") == target:
                return True
    return False


@dataclass
class Mounts:
    """File systems mounted for one test; ``unmount_all`` removes them all."""

    mounted: list[Path] = field(default_factory=list)

    def _mount(self, argv: list[str], target: Path) -> None:
        if shutil.which("mount") is None:
            raise MountRefused("the mount command is not installed")
        result = _run(argv)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            why = output.splitlines()[0] if output else f"status {result.returncode}"
            if os.geteuid() != 0 or "permission denied" in why.lower() or "must be" in why:
                raise MountRefused(f"{' '.join(argv)} refused (euid {os.geteuid()}): {why}")
            raise AssertionError(f"{' '.join(argv)} failed with status {result.returncode}: {why}")

    def tmpfs(self, target: Path, size: str = "1m", mode: str = "0700") -> Path:
        """Mount a fresh tmpfs of ``size`` on ``target`` (created if missing)."""
        target.mkdir(parents=True, exist_ok=True)
        self._mount(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(target)],
            target,
        )
        self.mounted.append(target)
        return target

    def bind_read_only(self, source: Path, target: Path) -> Path:
        """Show directory ``source`` read-only at ``target`` (a bind mount, then remount ro).

        Two steps, because older kernels ignore ``ro`` on the bind itself.
        """
        target.mkdir(parents=True, exist_ok=True)
        self._mount(["mount", "--bind", str(source), str(target)], target)
        self.mounted.append(target)
        self._mount(["mount", "-o", "remount,bind,ro", str(target)], target)
        return target

    def remount(self, target: Path, option: str) -> None:
        """Remount the file system at ``target`` with ``option`` (``ro`` or ``rw``)."""
        self._mount(["mount", "-o", f"remount,{option}", str(target)], target)

    def unmount_all(self) -> None:
        """Unmount everything this object mounted, newest first; lazily if busy.

        Raises ``AssertionError`` after trying them all if one is still mounted.
        """
        problems: list[str] = []
        while self.mounted:
            target = self.mounted.pop()
            if not _is_mount_point(target):
                continue
            result = _run(["umount", str(target)])
            if result.returncode != 0:
                lazy = _run(["umount", "-l", str(target)])
                if lazy.returncode != 0:
                    problems.append(
                        f"{target}: umount: {result.stderr.strip()}; umount -l:"
                        f" {lazy.stderr.strip()}"
                    )
        if problems:
            raise AssertionError("could not unmount: " + "; ".join(problems))


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still allocate on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(directory: Path, name: str = "filler") -> Path:
    """Write ``directory/name`` until the file system says ``ENOSPC``; return its path.

    Big chunks first, then ever smaller ones down to one byte, so nothing is left.
    Any other error fails the test.
    """
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 8, 1):
            data = b"\0" * chunk
            while True:
                try:
                    written = os.write(fd, data)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                if written < chunk:
                    break
    finally:
        os.close(fd)
    return path


def mount_refused(error: MountRefused | str) -> NoReturn:
    """Skip the test (or fail it on CI, which runs as root): it cannot mount."""
    message = f"cannot mount a test file system: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: these tests must run as root)")
    pytest.skip(message)
