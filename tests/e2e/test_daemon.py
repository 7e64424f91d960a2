"""End-to-end tests: the real daemon in a subprocess, spoken to over TCP on 127.0.0.1.

Each test starts ztick-tw as a user would (``python -m ztick_tw -c FILE``, the
``ztick-tw`` console script, or ``twistd -n ztick``) in a temporary directory, and
checks what a user can see: answers on the wire, files written by jobs, exit statuses,
stderr, the logfile and ``ztick-tw dump``.  No assertion depends on how long something
took; waits poll with generous deadlines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import (
    Daemon,
    DaemonExited,
    LineClient,
    daemon,
    now_ns,
    quote,
    read_lines,
    wait_all_executed,
    wait_status,
    wait_until,
)
from tests.helpers import STAT_KEYS
from tests.ports import can_bind

SECOND = 1_000_000_000
#: 2030-01-06 03:00:00 UTC in nanoseconds.
JAN_2030_NS = 1_893_898_800_000_000_000


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon setup in a fresh directory; every process it started is killed afterwards."""
    with daemon(tmp_path / "d") as d:
        yield d


def test_pipelined_round_trip_with_half_close(ztick: Daemon) -> None:
    """All instructions pipelined in one send, then half-close: every answer, then EOF.

    This is ``printf '...' | socat - TCP:...``: the answers come back in request order
    with the right content even though the client shut down its sending side before
    reading anything, and then the server closes the connection.
    """
    ztick.start()
    later = now_ns() + 3600 * SECOND
    requests = [
        'p1 RULE SET rt t. shell "echo hi"',
        "p2 SET t.a 2030-01-06 03:00:00",
        f"p3 SET t.b {later}",
        "p4 GET t.a",
        "p5 QUERY t.",
        "p6 REMOVE t.b",
        "p7 REMOVE t.b",
        "p8 GET t.b",
        "p9 LISTRULES",
        "p10 STAT",
        "p11 REMOVERULE rt",
        "p12 LISTRULES",
        "p13 QUERY",
    ]
    with socket.create_connection(("127.0.0.1", ztick.port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall("".join(f"{r}\n" for r in requests).encode())
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().split("\n")
    assert lines[-1] == "", f"answer does not end with a newline: {data!r}"
    lines = lines[:-1]
    stat_lines = [line for line in lines if line.startswith("p10 ")]
    others = [line for line in lines if not line.startswith("p10 ")]
    assert others == [
        "p1 OK",
        "p2 OK",
        "p3 OK",
        f"p4 OK planned {JAN_2030_NS}",
        f"p5 t.a planned {JAN_2030_NS}",
        f"p5 t.b planned {later}",
        "p5 OK",
        "p6 OK",
        "p7 ERROR",
        "p8 ERROR",
        "p9 rt t. shell echo hi",
        "p9 OK",
        "p11 OK",
        "p12 OK",
        f"p13 t.a planned {JAN_2030_NS}",
        "p13 OK",
    ]
    # STAT sits between p9 and p11: the answers are in request order.
    assert lines.index(stat_lines[0]) == lines.index("p9 OK") + 1
    assert lines.index(stat_lines[-1]) == lines.index("p11 OK") - 1
    assert stat_lines[-1] == "p10 OK"
    stats = dict(line[len("p10 ") :].split(" ", 1) for line in stat_lines[:-1])
    assert list(stats) == STAT_KEYS
    assert stats["jobs_total"] == "1"
    assert stats["jobs_planned"] == "1"
    assert stats["rules_total"] == "1"
    assert stats["persistence"] == "logfile"
    assert stats["compression"] == "idle"
    assert stats["auth_enabled"] == "0"
    assert int(stats["connections"]) >= 1
    assert ztick.stop() == 0


def test_shell_and_direct_rules_really_run(ztick: Daemon) -> None:
    """Jobs run through their rules as real child processes, and GET shows the outcome.

    A shell rule sees ZTICK_JOB_ID, ZTICK_ATTEMPT and ZTICK_RULE_ID; a command exiting 3
    makes the job failed; a job no rule matches is failed; a direct rule passes
    ``a;b|c`` to the executable literally (no shell: ``touch`` creates a file with that
    very name and nothing runs ``b`` or ``c``).
    """
    touch = shutil.which("touch")
    assert touch is not None
    out = ztick.workdir / "out"
    literal_dir = ztick.workdir / "literal"
    literal_dir.mkdir()
    ztick.start()
    c = ztick.client()
    command = f"echo $ZTICK_JOB_ID $ZTICK_ATTEMPT $ZTICK_RULE_ID >> {out}"
    c.ok(f"RULE SET rs s. shell {quote(command)}")
    c.ok('RULE SET rf f. shell "exit 3"')
    c.ok(f"RULE SET rd d. direct {touch} {quote(str(literal_dir / 'a;b|c'))}")
    due = now_ns() + 300_000_000
    for job in ("s.ok", "f.bad", "norule", "d.lit"):
        c.ok(f"SET {job} {due}")
    lines = wait_until(lambda: read_lines(out) or None, f"{out} to be written by the job")
    assert lines == ["s.ok 1 rs"]
    assert wait_status(c, "s.ok", ["executed", "failed"]) == "executed"
    assert wait_status(c, "f.bad", ["executed", "failed"]) == "failed"
    assert wait_status(c, "norule", ["executed", "failed"]) == "failed"
    assert wait_status(c, "d.lit", ["executed", "failed"]) == "executed"
    assert sorted(os.listdir(literal_dir)) == ["a;b|c"]
    assert c.get("s.ok") == ("executed", due)
    assert ztick.stop() == 0


def test_twenty_one_second_jobs_run_concurrently(ztick: Daemon) -> None:
    """Twenty ``sleep 1`` jobs due at the same moment all run at once, not one by one.

    Each job appends ``start <id>`` before sleeping and ``end <id>`` after; appends land
    in the file in the order they happen, so if every ``start`` comes before the first
    ``end`` the last job started before the first one finished (no clock is read).
    """
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    command = f"echo start $ZTICK_JOB_ID >> {marker}; sleep 1; echo end $ZTICK_JOB_ID >> {marker}"
    c.ok(f"RULE SET rc c. shell {quote(command)}")
    due = now_ns() + 500_000_000
    jobs = [f"c.{i:02d}" for i in range(20)]
    c.send_lines([f"s{i} SET {job} {due}" for i, job in enumerate(jobs)])
    for i in range(len(jobs)):
        assert c.read_response(f"s{i}") == [f"s{i} OK"]
    wait_all_executed(c, "c.", len(jobs), timeout=30)
    lines = read_lines(marker)
    assert sorted(lines) == sorted([f"start {j}" for j in jobs] + [f"end {j}" for j in jobs])
    last_start = max(i for i, line in enumerate(lines) if line.startswith("start "))
    first_end = min(i for i, line in enumerate(lines) if line.startswith("end "))
    assert last_start < first_end, f"the jobs did not overlap: {lines}"
    assert ztick.stop() == 0


def test_restart_keeps_state_and_does_not_rerun_finished_jobs(ztick: Daemon) -> None:
    """After SIGTERM and a restart on the same logfile, jobs and rules are all there.

    Planned jobs keep their times, the rule is listed the same, the executed job is
    still executed and does not run again: a sentinel job set after the restart runs
    through the same rule, and once its line is in the marker file the old job's line
    is still the only other one (jobs due earlier fire first).  Uses the ``ztick-tw``
    console script.
    """
    marker = ztick.workdir / "marker"
    ztick.start("script")
    c = ztick.client()
    c.ok(f"RULE SET rm m. shell {quote(f'echo $ZTICK_JOB_ID $ZTICK_ATTEMPT >> {marker}')}")
    c.ok('RULE SET rother other. direct /bin/echo "two words" x')
    later = now_ns() + 7200 * SECOND
    c.ok(f"SET f.one {later}")
    c.ok(f"SET f.two {later + 1}")
    c.ok("SET f.date 2030-01-06 03:00:00")
    c.ok(f"SET m.done {now_ns()}")
    wait_status(c, "m.done", ["executed"])
    assert read_lines(marker) == ["m.done 1"]
    jobs_before = c.query()
    rules_before = c.rules()
    assert ztick.stop() == 0

    ztick.start("script")
    c = ztick.client()
    assert c.query() == jobs_before
    assert c.rules() == rules_before
    assert jobs_before["m.done"][0] == "executed"
    c.ok(f"SET m.sentinel {now_ns()}")
    wait_until(lambda: len(read_lines(marker)) >= 2 or None, "the sentinel job to run")
    wait_status(c, "m.sentinel", ["executed"])
    assert read_lines(marker) == ["m.done 1", "m.sentinel 1"]
    assert c.get("m.done") == jobs_before["m.done"]
    assert ztick.stop() == 0


def test_config_unknown_key_is_one_line_naming_file_and_key(ztick: Daemon) -> None:
    """An unknown key stops startup: exit status 2, one stderr line naming file and key."""
    ztick.write_config(
        {
            "controller": {"listen": f"tcp:{ztick.port}:interface=127.0.0.1"},
            "database": {"logfile_path": "ztick.log", "frobnicate": 3},
        }
    )
    run = ztick.run_to_exit()
    assert run.process.returncode == 2
    lines = [line for line in run.stderr().splitlines() if line.strip()]
    assert len(lines) == 1, run.output()
    assert str(ztick.config_path) in lines[0]
    assert "frobnicate" in lines[0]
    assert "[database]" in lines[0]
    assert not ztick.logfile.exists()


def test_port_in_use_exits_1_saying_cannot_listen(ztick: Daemon) -> None:
    """A taken port: exit status 1 and a ``cannot listen`` line naming the endpoint.

    The daemon does not run on without its listener.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", ztick.port))
        blocker.listen(1)
        run = ztick.run_to_exit()
    assert run.process.returncode == 1, run.output()
    lines = [line for line in run.stderr().splitlines() if "cannot listen" in line]
    assert len(lines) == 1, run.output()
    assert f"tcp:{ztick.port}:interface=127.0.0.1" in lines[0]


def test_twistd_plugin_serves(ztick: Daemon) -> None:
    """``twistd -n ztick -c FILE`` finds the plugin and serves SET/GET.

    On SIGTERM it shuts down cleanly (the log is flushed and closed); twistd then ends
    itself with the signal that stopped it, as twistd does for every plugin.
    """
    ztick.start("twistd")
    c = ztick.client()
    c.ok("SET tw.job 2030-01-06 03:00:00")
    assert c.get("tw.job") == ("planned", JAN_2030_NS)
    assert ztick.stop() == -signal.SIGTERM
    output = ztick.runs[-1].output()
    assert "stopped; log flushed and closed" in output
    assert "Traceback" not in output
    assert ztick.dump().stdout.splitlines() == [f"SET tw.job {JAN_2030_NS} planned"]


def test_no_config_listens_on_5678_with_logfile_in_cwd(tmp_path: Path) -> None:
    """With no ``-c`` the daemon listens on 127.0.0.1:5678 and logs to ``./logfile``.

    ``python -m ztick_tw`` in an empty directory; the logfile is created mode 0600.
    Skipped when 5678 is busy.
    """
    if not can_bind(5678, reuse_address=True):
        pytest.skip("127.0.0.1:5678 is in use")
    with daemon(tmp_path / "empty", port=5678) as d:
        d.config_path.unlink()
        assert os.listdir(d.workdir) == []
        run = d.spawn([sys.executable, "-m", "ztick_tw"])
        try:
            d.wait_listening(run, port=5678)
        except DaemonExited:
            if "cannot listen" in run.output():
                pytest.skip("127.0.0.1:5678 was taken by someone else meanwhile")
            raise
        c = d.client()
        c.ok("SET default.job 2030-01-06 03:00:00")
        assert c.get("default.job") == ("planned", JAN_2030_NS)
        assert d.stop() == 0
        logfile = d.workdir / "logfile"
        assert logfile.is_file()
        assert stat.S_IMODE(logfile.stat().st_mode) == 0o600
        assert _dump(logfile) == [f"SET default.job {JAN_2030_NS} planned"]


def _dump(logfile: Path, *args: str) -> list[str]:
    """``ztick-tw dump`` of ``logfile`` via the console script; its stdout lines."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ztick-tw"), "dump", str(logfile), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_sigterm_ends_a_running_job_after_the_grace_and_it_reruns(ztick: Daemon) -> None:
    """SIGTERM during a ``sleep 30`` job: the job is ended and reruns at the next start.

    With shutdown_grace 0.5 the daemon ends the job (its whole process group) and exits
    with status 0, long before the sleep would end.

    The cut-short run is not recorded as an outcome: the job stays ``triggered`` in the
    log, and at the next start it runs again with ZTICK_ATTEMPT=2 (``interrupted_jobs``
    defaults to ``rerun``).
    """
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    command = f"echo started $ZTICK_ATTEMPT >> {marker}; sleep 30; echo finished >> {marker}"
    c.ok(f"RULE SET rl long. shell {quote(command)}")
    due = now_ns()
    c.ok(f"SET long.job {due}")
    wait_until(lambda: read_lines(marker) == ["started 1"] or None, "the long job to start")
    assert c.get("long.job") == ("triggered", due)
    assert ztick.stop(timeout=15) == 0
    ztick.wait_no_children(timeout=10)  # the sleep was killed with its process group
    assert read_lines(marker) == ["started 1"]
    assert "stopped at shutdown" in ztick.runs[-1].stderr()
    assert ztick.dump().stdout.splitlines()[-2:] == [
        f"SET long.job {due} planned",
        f"SET long.job {due} triggered",
    ]

    ztick.start()
    wait_until(
        lambda: read_lines(marker) == ["started 1", "started 2"] or None,
        "the interrupted job to run again as attempt 2",
    )
    c = ztick.client()
    assert c.get("long.job") == ("triggered", due)
    assert c.stat()["executions_inflight"] == "1"
    assert "running it again (attempt 2)" in ztick.runs[-1].stderr()
    assert ztick.stop(timeout=15) == 0
    ztick.wait_no_children(timeout=10)
    assert read_lines(marker) == ["started 1", "started 2"]


def test_overlong_line_drops_only_that_client(ztick: Daemon) -> None:
    """A line over 4096 bytes closes only its own connection.

    The lines before it are answered first; another connected client keeps being served.
    """
    ztick.start()
    other = ztick.client()
    other.ok("SET other.a 2030-01-06 03:00:00")
    bad = ztick.client()
    bad.send(f"b1 SET long.x {JAN_2030_NS}\n".encode() + b"x" * 5000 + b"\nb2 GET long.x\n")
    try:
        rest = bad.read_to_eof()
    except ConnectionResetError:
        pytest.fail("the connection was reset instead of closed after the answers")
    assert rest == b"b1 OK\n"
    assert other.get("long.x") == ("planned", JAN_2030_NS)
    assert other.get("other.a") == ("planned", JAN_2030_NS)
    with LineClient(ztick.port) as third:
        assert third.get("long.x") == ("planned", JAN_2030_NS)
    assert ztick.current is not None and ztick.current.alive()
    assert ztick.stop() == 0


def test_dump_of_a_real_logfile(ztick: Daemon) -> None:
    """``ztick-tw dump`` shows a real logfile's frames; ``--compact`` only the live state.

    Text output has one line per frame in order; ``--format json --compact`` has one
    JSON object per live job or rule.
    """
    ztick.start()
    c = ztick.client()
    c.ok('RULE SET rd d. shell "exit 0"')
    c.ok('RULE SET gone x. direct /bin/true "a b"')
    c.ok(f"SET d.one {JAN_2030_NS}")
    c.ok(f"SET d.two {JAN_2030_NS + 1}")
    c.ok("REMOVE d.two")
    c.ok("REMOVERULE gone")
    due = now_ns()
    c.ok(f"SET d.run {due}")
    wait_status(c, "d.run", ["executed"])
    assert ztick.stop() == 0

    text = ztick.dump()
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "RULE SET rd d. shell exit 0",
        "RULE SET gone x. direct /bin/true a b",
        f"SET d.one {JAN_2030_NS} planned",
        f"SET d.two {JAN_2030_NS + 1} planned",
        "REMOVE d.two",
        "REMOVERULE gone",
        f"SET d.run {due} planned",
        f"SET d.run {due} triggered",
        f"SET d.run {due} executed",
    ]
    compact = ztick.dump("--format", "json", "--compact")
    assert compact.returncode == 0, compact.stderr
    objects = [json.loads(line) for line in compact.stdout.splitlines()]
    assert objects == [
        {
            "type": "rule_set",
            "identifier": "rd",
            "pattern": "d.",
            "runner": {"type": "shell", "command": "exit 0"},
        },
        {"type": "set", "identifier": "d.one", "execution": JAN_2030_NS, "status": "planned"},
        {"type": "set", "identifier": "d.run", "execution": due, "status": "executed"},
    ]
    # ztick's key order, compact separators.
    assert compact.stdout.splitlines()[1] == (
        f'{{"type":"set","identifier":"d.one","execution":{JAN_2030_NS},"status":"planned"}}'
    )
