r"""Wire fuzzer: hostile clients against the real daemon never harm it or its data.

A well-behaved client first sets a few hundred jobs (due far in the future) and some
rules, and remembers them.  Then many threads open connections for a bounded time and
misbehave: random bytes, lines cut short before a disconnect, lines over 4096 bytes,
invalid UTF-8, NUL bytes, request-shaped lines with random mutations, resets
(``SO_LINGER`` 0), connect-and-close, one byte at a time (slowloris), floods that never
read their answers.  Afterwards the daemon must still answer, every remembered job and
rule must be exactly as set, the connection count must come back to the checking
client alone, and after a SIGTERM and a restart (logfile backend, fsync on) everything
remembered must still be there.

Soundness of that last check: every remembered id contains the character ``§``
(UTF-8 ``c2 a7``), and every byte stream a fuzz connection sends has that byte pair
replaced before it is sent.  A token the daemon reads is made only of characters
present in the decoded line (quoting and ``\`` escapes remove characters, they never
create any), so no fuzz request can name, replace or remove a remembered job or rule,
however it is mutated.  The fuzzer may create and remove its own jobs and rules.

The random choices come from a seed printed at the start (``ZTICK_FUZZ_SEED`` to
replay it); ``ZTICK_FUZZ_SECONDS`` sets how long the fuzzing lasts.  Thread timing
still varies from run to run.  No assertion depends on how long anything took.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, LineClient, daemon, now_ns, wait_until

SECOND = 1_000_000_000
DAY = 86_400 * SECOND

SEED = int(os.environ.get("ZTICK_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
FUZZ_SECONDS = float(os.environ.get("ZTICK_FUZZ_SECONDS", "8"))
FUZZ_THREADS = 12
JOBS = 300
RULES = 24

#: Every remembered id contains this; no fuzz connection ever sends its bytes.
MARK = "\u00a7"
MARK_BYTES = MARK.encode()
JOB_PREFIX = f"{MARK}keep."
RULE_PREFIX = f"{MARK}rule."

#: Socket timeout of fuzz connections (connect, and sends); reads use shorter ones.
FUZZ_TIMEOUT = 10.0
#: How long a canary (a well-formed request after garbage) may wait for its answer.
CANARY_TIMEOUT = 20.0


def sanitize(stream: bytes) -> bytes:
    """``stream`` with every ``§`` (c2 a7) replaced: see the module docstring."""
    while MARK_BYTES in stream:
        stream = stream.replace(MARK_BYTES, b"?")
    return stream


# ------------------------------------------------------------------------ the good client


def remembered_jobs() -> dict[str, tuple[str, int]]:
    """The jobs the good client sets: far in the future, each its own time."""
    base = now_ns() + DAY
    return {f"{JOB_PREFIX}{i:04d}": ("planned", base + i * SECOND) for i in range(JOBS)}


def remembered_rules() -> dict[str, str]:
    """The rules the good client sets, as LISTRULES shows them (without request ids)."""
    rules: dict[str, str] = {}
    for i in range(RULES):
        rule_id = f"{RULE_PREFIX}{i:02d}"
        pattern = f"{JOB_PREFIX}{i:02d}"
        if i % 3 == 0:
            rules[rule_id] = f"{rule_id} {pattern} shell true"
        elif i % 3 == 1:
            rules[rule_id] = f"{rule_id} {pattern} direct /bin/true a{i} b"
        else:
            rules[rule_id] = f"{rule_id} {pattern} http POST http://127.0.0.1:9/{i}"
    return rules


def set_everything(
    client: LineClient, jobs: dict[str, tuple[str, int]], rules: dict[str, str]
) -> None:
    """SET every job and RULE SET every rule, pipelined in batches; all must be OK."""
    requests = [f"SET {job} {ns}" for job, (_, ns) in jobs.items()]
    requests += [f"RULE SET {line}" for line in rules.values()]
    for start in range(0, len(requests), 100):
        batch = requests[start : start + 100]
        ids = [f"g{start + i}" for i in range(len(batch))]
        client.send_lines([f"{rid} {request}" for rid, request in zip(ids, batch, strict=True)])
        for rid, request in zip(ids, batch, strict=True):
            answer = client.read_response(rid)
            assert answer == [f"{rid} OK"], f"{request!r} answered {answer!r}"


def check_everything(
    client: LineClient, jobs: dict[str, tuple[str, int]], rules: dict[str, str], when: str
) -> None:
    """Every remembered job (GET and QUERY) and rule (LISTRULES) is exactly as set."""
    where = f"{when} (seed {SEED})"
    assert client.query(JOB_PREFIX) == jobs, f"QUERY of the remembered jobs changed {where}"
    for job, expected in jobs.items():
        assert client.get(job) == expected, f"GET {job} changed {where}"
    listed = [line for line in client.rules() if line.startswith(RULE_PREFIX)]
    assert sorted(listed) == sorted(rules.values()), f"remembered rules changed {where}"


# ------------------------------------------------------------------------ fuzz sessions

_INSTRUCTIONS = [
    "SET",
    "GET",
    "QUERY",
    "REMOVE",
    "RULE",
    "RULE SET",
    "REMOVERULE",
    "LISTRULES",
    "STAT",
    "AUTH",
]
_ARGS = [
    "fz.job",
    "fz.",
    "",
    '""',
    '"fz spaced"',
    '"fz \\" esc"',
    '"unterminated',
    "0",
    "-1",
    str(2**63),
    "1_000",
    "2030-01-01",
    "00:00:00",
    '"2030-01-01 00:00:00"',
    "2023-02-29",
    "shell",
    "direct",
    "http",
    "awf",
    "amqp",
    "redis",
    "true",
    "/bin/true",
    "GET",
    "POST",
    "http://127.0.0.1:9/",
    "amqp://h",
    "redis://h",
    "PUBLISH",
    "--input",
    "k=v",
    "keep.0001",
    "rule.01",
    "\t",
    "\x00",
    "\u00e9",
    "\ufeff",
]


#: Byte strings mutations like to insert: separators, quotes, escapes, bad UTF-8.
_EDIT_BYTES = [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b'"', b"\\", b" ", b"\r", b"\t"]


class Fuzzer:
    """One fuzzing thread: its own seeded RNG, its own connections, counters."""

    def __init__(self, port: int, seed: int, deadline: float) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.kinds: Counter[str] = Counter()
        self.canaries_ok = 0
        self.failures: list[str] = []
        self._n = 0

    # -- building streams -------------------------------------------------------------

    def _fuzz_id(self) -> str:
        self._n += 1
        return f"fz{self.rng.randrange(1000)}.{self._n}"

    def request_line(self) -> bytes:
        """A request-shaped line: id, instruction, a few plausible arguments."""
        rng = self.rng
        words = [self._fuzz_id(), rng.choice(_INSTRUCTIONS)]
        for _ in range(rng.randrange(6)):
            word = rng.choice(_ARGS)
            if word == "fz.job":
                word = f"fz.job.{rng.randrange(50)}"
            words.append(word)
        if rng.random() < 0.3:  # a valid request on the fuzzer's own ids
            words = [words[0], *self.valid_request()]
        return " ".join(words).encode()

    def valid_request(self) -> list[str]:
        """A well-formed request that touches only ``fz.`` ids (the fuzzer's own)."""
        rng = self.rng
        job = f"fz.{rng.choice(['job', 'past'])}.{rng.randrange(50)}"
        rule = f"fz.rule.{rng.randrange(20)}"
        pick = rng.randrange(7)
        if pick == 0:  # a time in the past: the job fires at once
            return ["SET", f"fz.past.{rng.randrange(50)}", str(now_ns() - SECOND)]
        if pick == 1:
            return ["SET", job, str(now_ns() + DAY + rng.randrange(10**12))]
        if pick == 2:
            return ["REMOVE", job]
        if pick == 3:
            pattern = rng.choice(["fz.", "fz.past.", "fz.job.1", '""'])
            runner = rng.choice(
                ["shell true", "direct /bin/true x", "http GET http://127.0.0.1:9/"]
            )
            return ["RULE", "SET", rule, pattern, runner]
        if pick == 4:
            return ["REMOVERULE", rule]
        if pick == 5:
            return ["GET", job]
        return ["QUERY", rng.choice(["fz.", "", '""'])]

    def mutate(self, line: bytes) -> bytes:
        """``line`` with a few random byte-level edits (overwrite, insert, delete, swap)."""
        rng = self.rng
        out = bytearray(line)
        for _ in range(rng.randrange(1, 5)):
            at = rng.randrange(len(out) + 1)
            choice = rng.randrange(5)
            chunk = rng.choice([*_EDIT_BYTES, rng.randbytes(rng.randrange(1, 4))])
            if choice == 0:
                out[at:at] = chunk
            elif choice == 1:
                out[at : at + len(chunk)] = chunk
            elif choice == 2:
                del out[at : at + rng.randrange(1, 4)]
            elif choice == 3 and len(out) > 2:
                i, j = rng.randrange(len(out)), rng.randrange(len(out))
                out[i], out[j] = out[j], out[i]
            else:
                out[at:at] = bytes([rng.randrange(256)])
        return bytes(out).replace(b"\n", b" ")

    def garbage_lines(self, count: int) -> bytes:
        """``count`` hostile lines, each under the line limit, each ending in a newline."""
        rng = self.rng
        lines: list[bytes] = []
        for _ in range(count):
            pick = rng.randrange(5)
            if pick == 0:
                line = rng.randbytes(rng.randrange(200)).replace(b"\n", b"")
            elif pick == 1:
                line = self.request_line()
            elif pick == 2:
                line = self.mutate(self.request_line())
            elif pick == 3:  # invalid UTF-8 inside a well-formed request
                line = (
                    self.request_line() + b" " + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80"])
                )
            else:  # NUL bytes
                line = self.request_line().replace(b" ", b"\x00", rng.randrange(1, 4))
            lines.append(line[:4000] + b"\n")
        return b"".join(lines)

    # -- sending ----------------------------------------------------------------------

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=FUZZ_TIMEOUT)
        sock.settimeout(FUZZ_TIMEOUT)
        return sock

    def send(self, sock: socket.socket, stream: bytes, chunked: bool = True) -> None:
        """Send the sanitized ``stream``, whole or in random-sized chunks."""
        stream = sanitize(stream)
        if not chunked:
            sock.sendall(stream)
            return
        view = memoryview(stream)
        while view:
            size = self.rng.randrange(1, 1500)
            sock.sendall(view[:size])
            view = view[size:]

    def drain(self, sock: socket.socket, seconds: float = 0.2) -> bytes:
        """Read whatever comes within about ``seconds`` (the server may close or reset)."""
        sock.settimeout(seconds)
        data = b""
        with contextlib.suppress(OSError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data

    @staticmethod
    def reset(sock: socket.socket) -> None:
        """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    # -- the sessions -----------------------------------------------------------------

    def s_random_bytes(self, sock: socket.socket) -> None:
        self.send(sock, self.rng.randbytes(self.rng.randrange(1, 6000)))
        self.drain(sock)

    def s_partial_line(self, sock: socket.socket) -> None:
        self.send(sock, self.garbage_lines(self.rng.randrange(3)) + self.request_line()[:-1])

    def s_huge_line(self, sock: socket.socket) -> None:
        size = self.rng.choice([4097, 5000, 70_000, 300_000])
        body = self.request_line() + b" " + b"x" * size
        if self.rng.random() < 0.5:
            body += b"\n" + self.request_line() + b"\n"  # never answered: closed before
        with contextlib.suppress(OSError):  # the daemon closes while we still send
            self.send(sock, self.garbage_lines(2) + body, chunked=False)
        self.drain(sock, 1.0)

    def s_invalid_utf8(self, sock: socket.socket) -> None:
        rng = self.rng
        lines = [
            self.request_line() + rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xf4\x90\x80\x80"])
            for _ in range(rng.randrange(1, 10))
        ]
        self.send(sock, b"\n".join(lines) + b"\n")
        self.drain(sock)

    def s_nul_bytes(self, sock: socket.socket) -> None:
        rng = self.rng
        lines = [b"\x00" * rng.randrange(1, 50)] + [
            self.request_line().replace(b" ", b" \x00", 2) for _ in range(5)
        ]
        self.send(sock, b"\n".join(lines) + b"\n")
        self.drain(sock)

    def s_mutated(self, sock: socket.socket) -> None:
        self.send(sock, self.garbage_lines(self.rng.randrange(1, 60)))
        self.drain(sock)

    def s_canary(self, sock: socket.socket) -> None:
        """Garbage, then a well-formed STAT whose answer must come on the same connection."""
        self.send(sock, self.garbage_lines(self.rng.randrange(1, 30)) + b"zzcanary STAT\n")
        sock.settimeout(CANARY_TIMEOUT)
        data = b""
        while b"\nzzcanary OK\n" not in b"\n" + data:
            chunk = sock.recv(65536)
            if not chunk:
                self.failures.append(f"connection closed before the canary's answer: {data!r}")
                return
            data += chunk
        self.canaries_ok += 1

    def s_reset(self, sock: socket.socket) -> None:
        self.send(sock, self.garbage_lines(self.rng.randrange(1, 20)))
        if self.rng.random() < 0.5:
            self.send(sock, self.request_line()[: self.rng.randrange(1, 20)])

    def s_connect_close(self, sock: socket.socket) -> None:
        pass

    def s_slowloris(self, sock: socket.socket) -> None:
        stream = sanitize(self.garbage_lines(1) + self.request_line())
        stop = time.monotonic() + self.rng.uniform(0.3, 1.5)
        for byte in stream:
            if time.monotonic() > stop:
                return
            sock.sendall(bytes([byte]))
            time.sleep(self.rng.uniform(0.005, 0.03))

    def s_no_read_flood(self, sock: socket.socket) -> None:
        """Pipelines requests with big answers (about 1.5 MB of them), never reads them.

        Kept to one burst: see ``test_query_flood_memory_is_bounded`` for why.
        """
        words = ["QUERY", "LISTRULES", "STAT"]
        burst = [f"f{i} {self.rng.choice(words)}\n".encode() for i in range(300)]
        self.send(sock, b"".join(burst))
        time.sleep(self.rng.uniform(0, 0.5))  # the daemon's answers pile up meanwhile

    def s_half_close(self, sock: socket.socket) -> None:
        self.send(sock, self.garbage_lines(self.rng.randrange(1, 20)) + self.request_line())
        sock.shutdown(socket.SHUT_WR)
        self.drain(sock, 2.0)

    SESSIONS: dict[str, tuple[Callable[[Fuzzer, socket.socket], None], str]] = {}

    def run(self) -> None:
        """Run random sessions until the deadline; unexpected errors go to ``failures``."""
        kinds = list(self.SESSIONS)
        while time.monotonic() < self.deadline:
            kind = self.rng.choice(kinds)
            session, ending = self.SESSIONS[kind]
            self.kinds[kind] += 1
            try:
                sock = self.connect()
            except OSError as exc:
                self.failures.append(f"{kind}: cannot connect: {exc!r}")
                return
            try:
                session(self, sock)
            except (ConnectionError, TimeoutError):
                pass  # the daemon may close a hostile connection; that is its right
            except Exception as exc:  # a bug in the fuzzer or a real failure: report it
                self.failures.append(f"{kind}: {exc!r}")
            finally:
                if ending == "reset" or self.rng.random() < 0.25:
                    self.reset(sock)
                else:
                    sock.close()


Fuzzer.SESSIONS = {
    "random bytes": (Fuzzer.s_random_bytes, "close"),
    "partial line then disconnect": (Fuzzer.s_partial_line, "close"),
    "huge line": (Fuzzer.s_huge_line, "close"),
    "invalid UTF-8": (Fuzzer.s_invalid_utf8, "close"),
    "NUL bytes": (Fuzzer.s_nul_bytes, "close"),
    "mutated requests": (Fuzzer.s_mutated, "close"),
    "garbage then canary": (Fuzzer.s_canary, "close"),
    "reset (SO_LINGER 0)": (Fuzzer.s_reset, "reset"),
    "connect and close": (Fuzzer.s_connect_close, "close"),
    "slowloris": (Fuzzer.s_slowloris, "close"),
    "flood without reading": (Fuzzer.s_no_read_flood, "reset"),
    "half-close": (Fuzzer.s_half_close, "close"),
}


def test_sanitize_removes_every_mark() -> None:
    """The soundness guard: no sanitized stream can carry the remembered ids' mark."""
    rng = random.Random(SEED)
    for _ in range(2000):
        parts = [rng.choice([b"\xc2", b"\xa7", MARK_BYTES, b"\xc2\xc2", rng.randbytes(3)])]
        parts += [rng.randbytes(rng.randrange(4)) for _ in range(3)]
        stream = b"".join(rng.sample(parts, len(parts)))
        assert MARK_BYTES not in sanitize(stream)
        with contextlib.suppress(UnicodeDecodeError):
            assert MARK not in sanitize(stream).decode()


# ------------------------------------------------------------------------ the test


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A logfile daemon (fsync on) whose shell runner is /bin/true: fuzz rules stay harmless."""
    config: dict[str, dict[str, str | bool | int | float | list[str]]] = {
        "shell": {"path": "/bin/true", "args": []},
        "database": {"persistence": "logfile", "fsync_on_persist": True},
    }
    with daemon(tmp_path / "d", config) as d:
        yield d


def test_hostile_clients_never_harm_the_daemon_or_its_data(ztick: Daemon) -> None:
    """After seconds of hostile connections from many threads, nothing remembered changed.

    The daemon still answers STAT, every job and rule the good client set is exactly as
    it was (GET, QUERY, LISTRULES), garbage never stopped a well-formed request after it
    from being answered on the same connection, the connection count comes back to the
    checking client alone, nothing unhandled was logged, and after a SIGTERM and a
    restart from the logfile everything remembered is still there.
    """
    print(f"wire fuzz seed {SEED} (replay with ZTICK_FUZZ_SEED={SEED})")
    run = ztick.start()
    jobs = remembered_jobs()
    rules = remembered_rules()
    with LineClient(ztick.port) as good:
        set_everything(good, jobs, rules)

    deadline = time.monotonic() + FUZZ_SECONDS
    fuzzers = [Fuzzer(ztick.port, SEED * 1000 + i, deadline) for i in range(FUZZ_THREADS)]
    threads = [threading.Thread(target=f.run, name=f"fuzz-{i}") for i, f in enumerate(fuzzers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=FUZZ_SECONDS + 60)
        assert not thread.is_alive(), f"fuzz thread {thread.name} is stuck (seed {SEED})"
    kinds: Counter[str] = Counter()
    for f in fuzzers:
        kinds.update(f.kinds)
    print(f"fuzz sessions: {sum(kinds.values())}: {dict(sorted(kinds.items()))}")
    failures = [failure for f in fuzzers for failure in f.failures]
    assert not failures, f"seed {SEED}: {failures[:5]}"
    assert set(kinds) == set(Fuzzer.SESSIONS), f"some session kinds never ran: {kinds}"
    canaries = sum(f.canaries_ok for f in fuzzers)
    assert canaries == kinds["garbage then canary"], (
        f"only {canaries} of {kinds['garbage then canary']} well-formed requests after"
        f" garbage were answered (seed {SEED})"
    )

    assert run.alive(), f"the daemon died under fuzzing (seed {SEED}):\n{run.output()}"
    checker = ztick.client()
    assert checker.stat()["persistence"] == "logfile"
    check_everything(checker, jobs, rules, "after fuzzing")
    wait_until(
        lambda: checker.stat()["connections"] == "1",
        "the connection count to come back to the checking client alone",
        on_timeout=lambda: f"STAT: {checker.stat()} (seed {SEED})",
    )
    output = run.output()
    for bad in ("Traceback", "Unhandled", "#critical", "#error"):
        assert bad not in output, (
            f"the daemon logged {bad!r} under fuzzing (seed {SEED}):\n{output[-5000:]}"
        )

    assert ztick.stop() == 0, ztick.current.output() if ztick.current else ""
    ztick.start()
    check_everything(ztick.client(), jobs, rules, "after a SIGTERM and a restart")


def _peak_rss_kib(pid: int) -> int:
    """The daemon's peak resident set size so far (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_query_flood_memory_is_bounded(ztick: Daemon) -> None:
    """64 KiB of pipelined QUERYs from a client that never reads cost bounded memory.

    Each ``QUERY`` line is 10 bytes and its answer, over 300 jobs, about 13 KB; a
    client that never reads must not make the daemon build more than a bounded amount
    of answers (reading from it should pause instead).  The peak RSS of the daemon
    may grow by less than 32 MB (a few thousand times less than the answers asked for).
    """
    run = ztick.start()
    with LineClient(ztick.port) as good:
        set_everything(good, remembered_jobs(), {})
        good.stat()
    before = _peak_rss_kib(run.pid)
    with socket.create_connection(("127.0.0.1", ztick.port), timeout=60) as flood:
        flood.sendall(b"".join(f"f{i} QUERY\n".encode() for i in range(6500)))
        assert flood.recv(1)  # the daemon has started answering the flood
        with LineClient(ztick.port, timeout=60) as probe:
            probe.stat()
        grown_mb = (_peak_rss_kib(run.pid) - before) / 1024
        Fuzzer.reset(flood)
    assert grown_mb < 32, f"peak RSS grew by {grown_mb:.0f} MB for a 64 KiB QUERY flood"
