"""Describe the machine the benchmarks ran on (for the results file and the docs)."""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    """``model name`` from ``/proc/cpuinfo`` (plus the hypervisor flag if virtualised)."""
    text = _read("/proc/cpuinfo")
    model = "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    if " hypervisor" in text:
        model += " (virtual machine)"
    return model


def ram_bytes() -> int:
    """``MemTotal`` from ``/proc/meminfo``."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def os_name() -> str:
    """``PRETTY_NAME`` from ``/etc/os-release``."""
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def filesystem_of(path: Path) -> str:
    """``<fstype> on <device>`` for the mount holding ``path`` (from ``/proc/mounts``)."""
    target = str(path.resolve())
    best = ("", "?", "?")
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        device, mount, fstype = parts[0], parts[1], parts[2]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype, device)
    return f"{best[1]} on {best[2]}"


def fsync_latency_us(directory: Path, rounds: int = 200) -> float:
    """Median time of ``write(30 bytes) + fsync`` on an append-only file in ``directory``."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples: list[float] = []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            os.write(fd, b"x" * 30)
            os.fsync(fd)
            samples.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def cpu_ticks() -> tuple[int, int]:
    """(total, idle + iowait) jiffies of all CPUs, from ``/proc/stat``."""
    fields = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


#: Iterations of ``speed_probe``'s loop: 0.13-0.21 s on this machine.
SPEED_PROBE_LOOPS = 3_000_000


def speed_probe() -> float:
    """Seconds a fixed pure-Python loop takes now: the machine's speed at this moment.

    The same code takes 0.13-0.21 s here from one minute to the next on an idle machine
    (a virtual machine shares its host), and every figure moves with it; recorded before
    each scenario so that a slow figure can be told from a slow moment.  Best of 3.
    """
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        total = 0
        for i in range(SPEED_PROBE_LOOPS):
            total += i * i
        best = min(best, time.perf_counter() - began)
    return best


def busy_percent(seconds: float) -> float:
    """How busy the whole machine was over the next ``seconds`` (100 = every CPU)."""
    total0, idle0 = cpu_ticks()
    time.sleep(seconds)
    total1, idle1 = cpu_ticks()
    if total1 == total0:
        return 0.0
    return 100.0 * (1 - (idle1 - idle0) / (total1 - total0))


_PF_KTHREAD = 0x00200000


def _process_table() -> dict[tuple[int, int], tuple[int, int]]:
    """``(pid, start time) -> (parent pid, CPU ticks incl. reaped children)``, user processes."""
    table: dict[tuple[int, int], tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        f = text.rsplit(")", 1)[1].split()
        if int(f[6]) & _PF_KTHREAD:
            continue
        cpu = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        table[(int(entry), int(f[19]))] = (int(f[1]), cpu)
    return table


class ForeignLoad:
    """Measures the CPU that *other* user processes used on the machine meanwhile.

    From ``/proc/<pid>/stat`` of every user process at the start and at ``stop``: the
    CPU time (their own plus their reaped children's) gained by processes that are not
    this benchmark or its descendants, as a percentage of all cores.  Kernel threads
    (journal, writeback, softirq) are left out: the benchmark causes most of theirs.
    """

    def __init__(self) -> None:
        self._before = _process_table()
        self._wall = time.perf_counter()

    def stop(self) -> float:
        """Percent of all cores used by other processes since construction."""
        after = _process_table()
        me = os.getpid()
        parents = {pid: parent for (pid, _), (parent, _) in {**self._before, **after}.items()}

        def ours(pid: int) -> bool:
            for _ in range(64):
                if pid == me:
                    return True
                if pid <= 1 or pid not in parents:
                    return False
                pid = parents[pid]
            return False

        ticks = 0
        for key, (_, cpu) in after.items():
            if ours(key[0]):
                continue
            before = self._before.get(key)
            ticks += cpu - (before[1] if before is not None else 0)
        capacity = (time.perf_counter() - self._wall) * (os.cpu_count() or 1)
        seconds = ticks / os.sysconf("SC_CLK_TCK")
        return max(0.0, 100.0 * seconds / capacity) if capacity > 0 else 0.0


def describe(workdir: Path) -> dict[str, str | int | float]:
    """Everything about the machine and software the figures depend on."""
    import twisted

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "ram_bytes": ram_bytes(),
        "os": os_name(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "twisted": twisted.__version__,
        "reactor": "epoll (Twisted default on Linux)",
        "workdir_filesystem": filesystem_of(workdir),
        "fsync_us_median": round(fsync_latency_us(workdir), 1),
        "load_average_at_start": " ".join(_read("/proc/loadavg").split()[:3]),
    }
