"""End-to-end: recurring jobs, policies, pause/resume, RUN and HISTORY on the real daemon.

The daemon runs as a subprocess (``python -m ztick_tw -c FILE``) and runs real shell
children that append lines to marker files; the checks are what a user sees: answers,
marker lines, HISTORY, STAT, and what survives a restart or ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, LineClient, daemon, quote, read_lines, wait_until

SECOND = 1_000_000_000


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon setup in a fresh directory; every process it started is killed afterwards."""
    with daemon(tmp_path / "d") as d:
        yield d


def history(c: LineClient, job_id: str, n: int = 20) -> list[dict[str, str]]:
    """HISTORY lines as dicts (quoted values unquoted), newest first."""
    from ztick_tw.protocol.tokenizer import tokenize

    answer = c.call(f"HISTORY {job_id} {n}")
    assert answer[-1] == "OK", answer
    out = []
    for line in answer[:-1]:
        fields: dict[str, str] = {}
        for word in tokenize(line):
            key, _, value = word.partition("=")
            fields[key] = value
        out.append(fields)
    return out


def marker_rule(c: LineClient, rule_id: str, pattern: str, marker: Path, extra: str = "") -> None:
    """A shell rule appending ``<job> <due ns> <attempt>`` to ``marker`` (then ``extra``)."""
    command = f"echo $ZTICK_JOB_ID $ZTICK_EXECUTION_NS $ZTICK_ATTEMPT >> {marker}{extra}"
    c.ok(f"RULE SET {rule_id} {pattern} shell {quote(command)}")


def test_every_second_runs_and_replans(ztick: Daemon) -> None:
    """``every 1 second`` runs each second with its own due time; GET shows the next one."""
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    marker_rule(c, "r", "tick.", marker)
    first = int(c.ok('SCHEDULE SET tick.a "every 1 second"'))
    wait_until(lambda: len(read_lines(marker)) >= 3 or None, "three runs", timeout=15)
    dues = [int(line.split()[1]) for line in read_lines(marker)[:3]]
    assert dues == [first, first + SECOND, first + 2 * SECOND]
    view = c.ok("SCHEDULE GET tick.a")
    assert view.startswith('"every 1 second" ') and "paused=0" in view
    status, _ns = c.get("tick.a") or ("?", 0)
    assert status in ("planned", "triggered")
    assert ztick.stop() == 0


def test_overlap_skip_never_runs_two_at_once(ztick: Daemon) -> None:
    """A 2.5 s command on ``every 1 second``: runs never overlap; skips are in HISTORY."""
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    command = f"echo start >> {marker}; sleep 2.5; echo end >> {marker}"
    c.ok(f"RULE SET r slow. shell {quote(command)}")
    c.ok('SCHEDULE SET slow.a "every 1 second"')
    wait_until(lambda: read_lines(marker).count("end") >= 2 or None, "two runs", timeout=20)
    c.ok("SCHEDULE REMOVE slow.a")
    lines = read_lines(marker)
    assert all(lines[i] != lines[i + 1] for i in range(len(lines) - 1)), lines
    outcomes = [h["outcome"] for h in history(c, "slow.a")]
    assert "skipped" in outcomes and "executed" in outcomes
    assert ztick.stop() == 0


def test_timeout_kills_the_whole_process_group(ztick: Daemon) -> None:
    """``RULE POLICY timeout=1s``: the shell and the sleep it started die; outcome timeout."""
    pidfile = ztick.workdir / "pid"
    ztick.start()
    c = ztick.client()
    c.ok(f"RULE SET r t. shell {quote(f'sleep 60 & echo $! > {pidfile}; wait')}")
    assert "timeout=1s" in c.ok("RULE POLICY r timeout=1s")
    c.ok(f"SET t.a {time.time_ns()}")
    entries = wait_until(
        lambda: [h for h in history(c, "t.a") if h["outcome"] != "running"] or None,
        "the run to end",
        timeout=15,
    )
    assert entries[0]["outcome"] == "timeout"
    sleeper = int(pidfile.read_text())
    wait_until(lambda: not _alive(sleeper) or None, "the grandchild sleep to die", timeout=10)
    assert c.get("t.a") == ("failed", c.get("t.a")[1])  # type: ignore[index]
    assert int(c.stat()["runs_timed_out"]) == 1
    assert ztick.stop() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_retries_with_backoff_then_success(ztick: Daemon) -> None:
    """retries=3: a command failing twice succeeds on attempt 3; ZTICK_ATTEMPT counts."""
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    marker_rule(c, "r", "flaky.", marker, f'; test "$(wc -l < {marker})" -ge 3')
    c.ok("RULE POLICY r retries=3 backoff=100ms..300ms")
    due = time.time_ns()
    c.ok(f"SET flaky.a {due}")
    wait_until(
        lambda: (c.get("flaky.a") or ("", 0))[0] == "executed" or None, "success", timeout=15
    )
    lines = read_lines(marker)
    assert [line.split()[2] for line in lines] == ["1", "2", "3"]
    assert {int(line.split()[1]) for line in lines} == {due}
    assert [h["attempt"] for h in history(c, "flaky.a")] == ["3", "2", "1"]
    assert int(c.stat()["runs_retried"]) == 2
    assert ztick.stop() == 0


def test_pause_run_resume(ztick: Daemon) -> None:
    """Paused: no runs, GET says paused; RUN runs once and it stays paused; RESUME resumes."""
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    marker_rule(c, "r", "p.", marker)
    c.ok('SCHEDULE SET p.a "every 1 second starting tomorrow 00:00"')
    c.ok("PAUSE p.a")
    assert (c.get("p.a") or ("", 0))[0] == "paused"
    c.ok("RUN p.a")
    wait_until(lambda: read_lines(marker) or None, "the RUN", timeout=10)
    wait_until(
        lambda: history(c, "p.a")[0]["outcome"] == "executed" or None, "RUN to end", timeout=10
    )
    assert (c.get("p.a") or ("", 0))[0] == "paused"
    assert c.stat()["jobs_paused"] == "1"
    c.ok("RESUME p.a")
    assert (c.get("p.a") or ("", 0))[0] == "planned"
    assert len(read_lines(marker)) == 1
    assert ztick.stop() == 0


def test_misfire_once_across_a_real_restart(ztick: Daemon) -> None:
    """Down for ~3 s: ``misfire=once`` runs one catch-up, counts the missed, never re-runs."""
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    marker_rule(c, "r", "m.", marker)
    c.ok('SCHEDULE SET m.a "every 1 second" misfire=once')
    wait_until(lambda: len(read_lines(marker)) >= 2 or None, "two runs", timeout=15)
    assert ztick.stop() == 0
    before = read_lines(marker)
    time.sleep(3.2)
    ztick.start()
    c = ztick.client()
    wait_until(lambda: len(read_lines(marker)) > len(before) or None, "the catch-up", timeout=15)
    assert int(c.stat()["occurrences_missed"]) >= 2
    c.ok("SCHEDULE REMOVE m.a")
    time.sleep(0.3)
    dues = [line.split()[1] for line in read_lines(marker)]
    assert len(dues) == len(set(dues)), f"an occurrence ran twice: {dues}"
    # The catch-up is one run for the latest missed occurrence, not one per second missed.
    after = read_lines(marker)[len(before) :]
    gap = (int(after[0].split()[1]) - int(before[-1].split()[1])) / SECOND
    assert gap >= 3, after
    assert ztick.stop() == 0


def test_schedule_pause_and_policy_survive_kill_9(ztick: Daemon) -> None:
    """An acknowledged schedule, pause and rule policy are all there after ``kill -9``."""
    ztick.start()
    c = ztick.client()
    c.ok('RULE SET r k. shell "true"')
    c.ok("RULE POLICY r retries=2 timeout=5s")
    c.ok('SCHEDULE SET k.a "0 2 * * *" tz=Europe/Paris')
    c.ok('SCHEDULE SET k.b "every 1 hour starting tomorrow 00:00"')
    c.ok("PAUSE k.b")
    view_a = c.ok("SCHEDULE GET k.a")
    run = ztick.current
    assert run is not None
    os.kill(run.pid, signal.SIGKILL)
    run.process.wait(10)
    ztick.start()
    c = ztick.client()
    assert c.ok("SCHEDULE GET k.a") == view_a
    assert (c.get("k.b") or ("", 0))[0] == "paused"
    policy = c.ok("RULE POLICY r")
    assert "retries=2" in policy and "timeout=5s" in policy
    listed = c.call("LISTSCHEDULES k.")
    assert [line.split()[0] for line in listed[:-1]] == ["k.a", "k.b"]
    assert ztick.stop() == 0
