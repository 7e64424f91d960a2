"""Fault injection for schedules (SPEC §8-9, issue 10 item 3): SIGKILL while jobs recur.

One daemon (logfile backend, ``fsync_on_persist = true``, ``interrupted_jobs = "rerun"``,
a compaction every second) is killed with SIGKILL and restarted
on the same logfile, round after round, while client threads send ``PAUSE``/``RESUME`` of
their stable jobs (``s.<t>.<i>``, each scheduled once at setup on ``every 1 second`` or
``every 2 seconds``, ``misfire=once`` or ``misfire=skip``), ``SCHEDULE SET``/``SCHEDULE
REMOVE`` of their churn jobs (``c.<t>.<i>``) and ``RULE POLICY`` of their rule (``p.<t>``,
which runs their stable jobs), recording what was acknowledged (``KeyState``, as in
``tests/e2e/faults.py``).  Every run's shell child appends a start line ``S <job> <due ns>
<epoch> <attempt>`` and, 0.3 s later, an end line ``E ...`` to a marker file; ``epoch``
is the number of the daemon start that ran it (an environment variable the daemon passes
on to its children).

After every restart:

- every schedule (text and ``misfire``), pause and rule policy holds its last
  acknowledged value, or the value of a request unanswered at the kill;
- no (job, due) pair was run twice, except a run interrupted by a kill: the last run of
  that job started by a killed daemon may run again in a later epoch, with
  ``ZTICK_ATTEMPT`` raised (SPEC §2: interrupted runs are re-run);
- after a downtime of 3.5 s (longer than the periods): the restarted daemon logs, for
  every unpaused scheduled job, that its missed occurrences (at least those due while it
  was down) ran once (``misfire=once``: exactly one catch-up, due during the downtime) or
  not at all (``misfire=skip``); STAT ``occurrences_missed`` is the sum it logged.  A job
  whose run the kill interrupted re-runs that run first; then at most one catch-up
  (``once``) or none (``skip``) is due during the downtime.

At the end every stable job is paused, its runs finish, and ``SCHEDULE GET`` says
``runs=`` = the occurrences it ran (less those a kill interrupted and the restart did not
re-run) and ``next=`` is on its grid, after every due time it ran.

Three more tests pin what this campaign found (bugs, since fixed): a compaction during a
scheduled run must keep the occurrence that runs for its re-run after a kill; the missed
occurrences of an interrupted job are counted; with ``interrupted_jobs = "fail"`` a
schedule goes on recurring.

The seed (``ZTICK_SCHEDULE_FAULT_SEED``, fixed by default) drives every random choice but thread
timing; it is named in every failure.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shlex
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.daemon import (
    Daemon,
    LineClient,
    daemon,
    now_ns,
    quote,
    read_lines,
    wait_until,
)
from tests.e2e.faults import Conn, KeyState, Value
from ztick_tw.protocol.tokenizer import tokenize

SEED = int(os.environ.get("ZTICK_SCHEDULE_FAULT_SEED", "20261203"))
ROUNDS = 6
#: Rounds whose daemon stays down this long before the restart (a few periods).
DOWNTIME = 3.5
THREADS = 2
STABLE = 4
CHURN = 3
SECOND = 1_000_000_000
PERIODS = {"every 1 second": SECOND, "every 2 seconds": 2 * SECOND}
EPOCH_VARIABLE = "ZTICK_FAULT_EPOCH"
CONFIG: dict[str, dict[str, str | bool | int | float | list[str]]] = {
    "database": {"persistence": "logfile", "fsync_on_persist": True, "compression_interval": 1},
    "scheduler": {"interrupted_jobs": "rerun", "shutdown_grace": 2.0},
}
MISFIRE_LOG = re.compile(r"job (\S+): (\d+) occurrence\(s\) missed; running (\d+) now")
INTERRUPTED_MISSED_LOG = re.compile(
    r"job (\S+): (\d+) occurrence\(s\) missed after its interrupted run"
)
RERUN_LOG = re.compile(r"job (\S+) was running when ztick-tw last stopped; running it again")


def ok(answer: list[str]) -> bool:
    """Whether ``answer`` is one ``OK`` line (with or without a value)."""
    return len(answer) == 1 and (answer[0] == "OK" or answer[0].startswith("OK "))


def schedule_value(view: str) -> str:
    """``"<text>" misfire=<m>`` from a SCHEDULE GET answer (after ``OK ``)."""
    tokens = tokenize(view)
    options = dict(t.partition("=")[::2] for t in tokens[1:])
    return f"{tokens[0]}|misfire={options['misfire']}"


def schedule_fields(view: str) -> dict[str, str]:
    """The ``key=value`` fields of a SCHEDULE GET answer (after ``OK ``)."""
    return dict(t.partition("=")[::2] for t in tokenize(view)[1:])


@dataclass
class Model:
    """One client thread's ids and what the daemon acknowledged of them.

    Keys: ``sched:<job>`` (``"<text>|misfire=<m>"``, ``"-"`` once SCHEDULE REMOVE made it
    a one-shot, ``None`` never set), ``pause:<job>`` (``"1"``/``"0"``), ``policy:p.<t>``.
    """

    thread: int
    keys: dict[str, KeyState] = field(default_factory=dict)
    expected: dict[str, Value] = field(default_factory=dict)
    #: The first occurrence (the grid's origin) of each job's acknowledged schedule.
    first: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    acked: int = 0

    def state(self, key: str) -> KeyState:
        return self.keys.setdefault(key, KeyState())

    def stable(self) -> list[str]:
        return [f"s.{self.thread}.{i}" for i in range(STABLE)]

    def churn(self) -> list[str]:
        return [f"c.{self.thread}.{i}" for i in range(CHURN)]

    def sent(self, key: str, value: Value) -> None:
        self.state(key).pending.append(value)
        self.expected[key] = value

    def answered(self, key: str, request: str, answer: list[str]) -> None:
        state = self.state(key)
        value = state.pending.pop(0)
        if ok(answer):
            state.acked = value
            self.acked += 1
            if request.startswith("SCHEDULE SET"):
                self.first[key.split(":", 1)[1]] = int(answer[0][3:])
        else:
            self.problems.append(f"thread {self.thread}: {request!r} answered {answer!r}")
            self.expected[key] = state.pending[-1] if state.pending else state.acked

    def settled(self, key: str) -> Value:
        """The acknowledged value when no request on ``key`` is unanswered, else ``"?"``."""
        state = self.state(key)
        return "?" if state.pending else state.acked

    def next_request(self, rng: random.Random) -> tuple[str, str, Value]:
        """(key, request, value after it): PAUSE/RESUME, SCHEDULE SET/REMOVE or RULE POLICY."""
        roll = rng.random()
        if roll < 0.35:
            job = rng.choice(self.stable())
            if self.expected.get(f"pause:{job}") == "1":
                return f"pause:{job}", f"RESUME {job}", "0"
            if rng.random() < 0.4:
                return f"pause:{job}", f"PAUSE {job}", "1"
        if roll < 0.55:
            rule = f"p.{self.thread}"
            value = (
                f"timeout={rng.randrange(10, 60)}s retries={rng.randrange(4)}"
                f" backoff={rng.randrange(1, 10) * 100}ms..{rng.randrange(1, 10)}s"
            )
            return f"policy:{rule}", f"RULE POLICY {rule} {value}", value
        job = rng.choice(self.churn())
        current = self.expected.get(f"sched:{job}")
        if current not in (None, "-") and rng.random() < 0.4:
            return f"sched:{job}", f"SCHEDULE REMOVE {job}", "-"
        text = rng.choice(list(PERIODS))
        misfire = rng.choice(("once", "skip"))
        return (
            f"sched:{job}",
            f"SCHEDULE SET {job} {quote(text)} misfire={misfire}",
            f"{text}|misfire={misfire}",
        )


def run_client(port: int, model: Model, rng: random.Random, stop: threading.Event) -> None:
    """Small pipelined batches until the connection dies (the kill) or ``stop`` is set."""
    n = 0
    try:
        with Conn(port) as conn:
            while not stop.is_set():
                batch = []
                for _ in range(rng.randint(1, 3)):
                    key, request, value = model.next_request(rng)
                    n += 1
                    model.sent(key, value)
                    batch.append((f"t{model.thread}.{n}", key, request))
                conn.send_lines(f"{rid} {request}" for rid, _, request in batch)
                for rid, key, request in batch:
                    model.answered(key, request, conn.read_answer(rid))
                stop.wait(rng.uniform(0.03, 0.15))
    except TimeoutError:
        model.problems.append(f"thread {model.thread}: no answer in time")
    except OSError:
        pass  # the kill
    except Exception as e:
        model.problems.append(f"thread {model.thread}: {e!r}")


@dataclass(frozen=True)
class Start:
    """One ``S`` line of the marker file."""

    index: int
    job: str
    due: int
    epoch: int
    attempt: int


def starts(marker: Path) -> list[Start]:
    """Every run's start line in the marker file, in file order."""
    out = []
    for i, line in enumerate(read_lines(marker)):
        words = line.split()
        if words[0] == "S":
            out.append(Start(i, words[1], int(words[2]), int(words[3]), int(words[4])))
    return out


def repeated_runs(runs: list[Start], killed: set[int]) -> tuple[list[str], dict[str, int]]:
    """Problems with runs repeated in the marker; per job, interrupted runs never re-run.

    A (job, due) pair may run again only if the earlier run was the last run of that job
    started by a daemon that was killed, and the rerun came from a later daemon start
    with ``ZTICK_ATTEMPT`` > 1.
    """
    last: dict[tuple[str, int], int] = {}
    for r in runs:
        last[(r.job, r.epoch)] = r.index
    by_pair: dict[tuple[str, int], list[Start]] = defaultdict(list)
    for r in runs:
        by_pair[(r.job, r.due)].append(r)
    problems: list[str] = []
    not_rerun: dict[str, int] = defaultdict(int)
    for (job, due), group in by_pair.items():
        interrupted = group[-1].epoch in killed and last[(job, group[-1].epoch)] == group[-1].index
        if interrupted:
            not_rerun[job] += 1
        for earlier, later in itertools.pairwise(group):
            if not (
                earlier.epoch in killed
                and last[(job, earlier.epoch)] == earlier.index
                and later.epoch > earlier.epoch
                and later.attempt > 1
            ):
                problems.append(
                    f"job {job} due {due} ran {len(group)} times: {group} (only the last run"
                    " a killed daemon started may run again, in a later start, attempt > 1)"
                )
                break
    return problems, not_rerun


def grid(first: int, period: int, low: int, high: int) -> int:
    """How many occurrences ``first + k * period`` lie in ``(low, high]``."""
    if high < first:
        return 0
    top = (high - first) // period
    bottom = (low - first) // period if low >= first else -1
    return max(0, top - bottom)


@dataclass
class Campaign:
    """The daemon, the client models, the daemon starts (epochs) and what was checked."""

    d: Daemon
    rng: random.Random
    monkeypatch: pytest.MonkeyPatch
    models: list[Model] = field(default_factory=list)
    epoch: int = 0
    killed: set[int] = field(default_factory=set)
    catch_ups: int = 0
    missed_logged: int = 0
    interrupted_misfires: int = 0

    @property
    def marker(self) -> Path:
        return self.d.workdir / "marker"

    def fail(self, what: str, problems: list[str]) -> None:
        """Raise with the seed, the moment and the problems (if any)."""
        if problems:
            shown = "\n  ".join(problems[:25])
            raise AssertionError(
                f"schedule fault injection seed {SEED}, {what}:\n  {shown}\n"
                f"daemon working directory: {self.d.workdir}"
            )

    def start(self) -> None:
        """Start the daemon as epoch ``self.epoch + 1`` (its children see the number)."""
        self.epoch += 1
        self.monkeypatch.setenv(EPOCH_VARIABLE, str(self.epoch))
        self.d.start()

    def setup(self) -> None:
        """Start; the marker rules; schedule every stable job (acknowledged, unpaused)."""
        self.start()
        m = shlex.quote(str(self.marker))
        run = f"$ZTICK_JOB_ID $ZTICK_EXECUTION_NS ${EPOCH_VARIABLE} $ZTICK_ATTEMPT >> {m}"
        command = quote(f"echo S {run}; sleep 0.3; echo E {run}")
        self.models = [Model(t) for t in range(THREADS)]
        with Conn(self.d.port) as conn:
            assert conn.call(f"RULE SET c c. shell {command}") == ["OK"]
            for model in self.models:
                assert conn.call(
                    f"RULE SET p.{model.thread} s.{model.thread}. shell {command}"
                ) == ["OK"]
                for i, job in enumerate(model.stable()):
                    text = list(PERIODS)[i % 2]
                    misfire = ("once", "skip")[i // 2 % 2]
                    model.sent(f"sched:{job}", f"{text}|misfire={misfire}")
                    request = f"SCHEDULE SET {job} {quote(text)} misfire={misfire}"
                    model.answered(f"sched:{job}", request, conn.call(request))
                    model.state(f"pause:{job}").acked = model.expected[f"pause:{job}"] = "0"

    def round(self, round_no: int, downtime: float) -> int:
        """Load, SIGKILL at a random moment, stay down ``downtime`` s, restart; time of death."""
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=run_client,
                args=(self.d.port, m, random.Random(self.rng.random()), stop),
                daemon=True,
            )
            for m in self.models
        ]
        for thread in threads:
            thread.start()
        time.sleep(self.rng.uniform(0.8, 2.5))
        self.d.kill()
        dead = now_ns()
        self.killed.add(self.epoch)
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
            assert not thread.is_alive(), f"seed {SEED} round {round_no}: a client thread hangs"
        time.sleep(downtime)
        return dead

    def verify(self, conn: Conn, what: str) -> None:
        """Every schedule, pause and policy as acknowledged (or as an unanswered request)."""
        problems: list[str] = []
        for model in self.models:
            problems.extend(model.problems)
            model.problems.clear()
            actual: dict[str, Value] = {}
            for job in model.stable() + model.churn():
                answer = conn.call(f"SCHEDULE GET {job}")
                if ok(answer):
                    actual[f"sched:{job}"] = schedule_value(answer[0][3:])
                    if job.startswith("s."):
                        paused = schedule_fields(answer[0][3:])["paused"]
                        actual[f"pause:{job}"] = paused
                elif conn.call(f"GET {job}")[0].startswith("OK "):
                    actual[f"sched:{job}"] = "-"
            rule = f"p.{model.thread}"
            answer = conn.call(f"RULE POLICY {rule}")
            actual[f"policy:{rule}"] = answer[0][3:] if ok(answer) else None
            if actual[f"policy:{rule}"] == "timeout=- retries=0 backoff=-":
                actual[f"policy:{rule}"] = None  # never set: the defaults
            for key in sorted(set(model.keys) | set(actual)):
                state = model.keys.get(key, KeyState())
                if actual.get(key) not in state.allowed():
                    problems.append(
                        f"thread {model.thread} {key}: last acknowledged {state.acked!r},"
                        f" unanswered at the kill {state.pending!r}; now {actual.get(key)!r}"
                    )
                state.acked = actual.get(key)
                state.pending.clear()
                model.expected[key] = state.acked
        problems.extend(repeated_runs(starts(self.marker), self.killed)[0])
        self.fail(what, problems)

    def check_misfire(self, conn: Conn, dead: int, round_no: int) -> None:
        """After a long downtime: catch-ups as the misfire policies say, missed ones counted.

        A job whose run the kill interrupted re-runs that occurrence first (attempt 2); the
        occurrences missed meanwhile then coalesce per ``misfire`` when it is re-planned.
        Every other unpaused scheduled job logs its missed occurrences and what it runs.
        """
        stat = conn.stat()
        stat_ns = now_ns()
        began = stat_ns - int(stat["uptime_ns"])  # at or before the scheduler started
        run = self.d.current
        assert run is not None
        output = run.output()
        logged = {m[1]: (int(m[2]), int(m[3])) for m in MISFIRE_LOG.finditer(output)}
        rerun = set(RERUN_LOG.findall(output))
        problems: list[str] = []
        missed_total = sum(missed for missed, _ in logged.values())
        missed_total += sum(int(m[2]) for m in INTERRUPTED_MISSED_LOG.finditer(output))
        if int(stat["occurrences_missed"]) != missed_total:
            problems.append(
                f"STAT occurrences_missed {stat['occurrences_missed']}, the log says"
                f" {missed_total} in all: {logged}"
            )
        expect: dict[str, str] = {}
        for model in self.models:
            for job in model.stable() + model.churn():
                value = model.settled(f"sched:{job}")
                pause = model.settled(f"pause:{job}") if job.startswith("s.") else "0"
                if not isinstance(value, str) or value in ("-", "?") or pause != "0":
                    continue
                text, _, misfire = value.partition("|misfire=")
                expect[job] = misfire
                if job in rerun:
                    self.interrupted_misfires += 1
                    continue
                period = PERIODS[text]
                first = model.first[job]
                low = grid(first, period, dead, began)
                high = grid(first, period, dead - period - SECOND, stat_ns)
                got = logged.get(job)
                if got is None or not low <= got[0] <= high:
                    problems.append(
                        f"job {job} ({value}): logged (missed, run) {got}; expected missed in"
                        f" [{low}, {high}] (down {(began - dead) / SECOND:.2f}s)"
                    )
                elif got[1] != (1 if misfire == "once" else 0):
                    problems.append(f"job {job} ({value}): misfire ran {got[1]} occurrences")
        self.fail(f"misfire after round {round_no}", problems)
        self.missed_logged += missed_total

        def catch_up_problems() -> tuple[list[str], list[str]]:
            """(runs that must never happen, catch-ups not seen yet)."""
            runs = [r for r in starts(self.marker) if r.epoch == self.epoch]
            wrong: list[str] = []
            waiting: list[str] = []
            for job, misfire in expect.items():
                old = [r.due for r in runs if r.job == job and r.due <= dead]
                early = [r.due for r in runs if r.job == job and dead < r.due <= began]
                window = [r.due for r in runs if r.job == job and dead < r.due <= stat_ns]
                if len(old) > (job in rerun):
                    wrong.append(f"job {job} ran occurrences due before the kill: {old}")
                if misfire == "skip" and early:
                    wrong.append(f"job {job} (misfire=skip) ran missed occurrences {early}")
                if misfire == "once" and len(early) > 1:
                    wrong.append(f"job {job} (misfire=once) ran {len(early)} catch-ups {early}")
                if misfire == "once" and job not in rerun and not window:
                    waiting.append(f"job {job} (misfire=once): no catch-up run")
                if job in rerun and not old:
                    waiting.append(f"job {job}: its interrupted run was not re-run")
            return wrong, waiting

        deadline = time.monotonic() + 10
        while True:
            wrong, waiting = catch_up_problems()
            if wrong or not waiting or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.fail(f"catch-up runs after round {round_no}", wrong + waiting)
        self.catch_ups += sum(1 for j, m in expect.items() if m == "once" and j not in rerun)

    def finish(self, conn: Conn) -> None:
        """Pause every stable job, let runs end; runs= and next= agree with the marker."""
        for model in self.models:
            for job in model.stable():
                assert ok(conn.call(f"PAUSE {job}"))

        def quiet() -> bool:
            stat = conn.stat()
            if stat["executions_inflight"] != "0" or stat["executions_pending"] != "0":
                return False
            lines = read_lines(self.marker)
            return sum(w.startswith("S ") for w in lines) == sum(w.startswith("E ") for w in lines)

        wait_until(quiet, "the runs to end", timeout=15)
        runs = starts(self.marker)
        problems, not_rerun = repeated_runs(runs, self.killed)
        for model in self.models:
            for job in model.stable():
                fields = schedule_fields(conn.call(f"SCHEDULE GET {job}")[0][3:])
                value = model.settled(f"sched:{job}")
                assert isinstance(value, str)
                period = PERIODS[value.partition("|")[0]]
                first = model.first[job]
                dues = {r.due for r in runs if r.job == job}
                off_grid = sorted(d for d in dues if (d - first) % period)
                count = int(fields["runs"])
                nxt = int(fields["next"])
                if not len(dues) - not_rerun[job] <= count <= len(dues):
                    problems.append(
                        f"job {job}: runs={count}, but {len(dues)} occurrences ran"
                        f" ({not_rerun[job]} of them interrupted by a kill and not re-run)"
                    )
                # A paused job whose last run a kill interrupted re-runs it when resumed:
                # its next= may then be that run's due time, never earlier.
                pending = not_rerun[job] > 0
                too_early = dues and (nxt < max(dues) if pending else nxt <= max(dues))
                if off_grid or (nxt - first) % period or too_early:
                    problems.append(
                        f"job {job}: next={nxt}, first {first}, period {period}; ran"
                        f" off the grid: {off_grid}; last due run {max(dues, default=None)}"
                    )
        self.fail("at the end", problems)


def test_schedules_pauses_and_policies_survive_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL while scheduled jobs run: nothing acknowledged is lost, nothing runs twice.

    See the module docstring for every check.  Two of the rounds stay down for longer
    than the periods, so restarts meet missed occurrences of both misfire policies.
    """
    started = time.monotonic()
    with daemon(tmp_path / "d", CONFIG) as d:
        campaign = Campaign(d, random.Random(SEED), monkeypatch)
        campaign.setup()
        long_down = {ROUNDS - 1, campaign.rng.randrange(ROUNDS - 1)}
        for round_no in range(ROUNDS):
            downtime = DOWNTIME if round_no in long_down else 0.0
            dead = campaign.round(round_no, downtime)
            campaign.start()
            with Conn(d.port) as conn:
                if downtime:
                    campaign.check_misfire(conn, dead, round_no)
                campaign.verify(conn, f"after round {round_no}")
        with Conn(d.port) as conn:
            time.sleep(1.5)  # the last start's own runs
            campaign.finish(conn)
        assert d.stop() == 0
        tracebacks = [run.stderr_path.name for run in d.runs if "Traceback" in run.output()]
    runs = starts(campaign.marker)
    reruns = len(runs) - len({(r.job, r.due) for r in runs})
    acked = sum(m.acked for m in campaign.models)
    print(
        f"seed {SEED}: {ROUNDS} kills in {time.monotonic() - started:.1f}s; {len(runs)} runs,"
        f" {reruns} re-runs of interrupted ones; {acked} requests acknowledged;"
        f" {campaign.catch_ups} misfire=once catch-ups, {campaign.missed_logged} missed logged,"
        f" {campaign.interrupted_misfires} interrupted jobs re-run after a long downtime"
    )
    assert tracebacks == [], f"seed {SEED}: tracebacks in {tracebacks}"
    assert acked > 100, f"seed {SEED}: only {acked} requests acknowledged"
    assert campaign.catch_ups > 0 and campaign.missed_logged > 0, f"seed {SEED}: no misfire"


def run_marker_rule(c: LineClient, marker: Path, seconds: float) -> None:
    """Rule ``r`` for ``k.``: append ``S <job> <due ns> <attempt>``, then sleep."""
    line = f"$ZTICK_JOB_ID $ZTICK_EXECUTION_NS $ZTICK_ATTEMPT >> {shlex.quote(str(marker))}"
    c.ok(f"RULE SET r k. shell {quote(f'echo S {line}; sleep {seconds}')}")


def test_compaction_during_a_run_keeps_the_interrupted_occurrence(tmp_path: Path) -> None:
    """Compaction, then kill -9, while a scheduled run runs: the re-run is that occurrence.

    ``every 1 hour`` fires at once; while its first run sleeps, ``kill -USR1`` compacts
    the log and ``kill -9`` ends the daemon.  After the restart the interrupted run is run
    again (``interrupted_jobs = "rerun"``) with its own due time and attempt 2, as it is
    without the compaction; the occurrence due in an hour does not run now.
    """
    with daemon(tmp_path / "d", {"database": {"compression_interval": 0}}) as d:
        marker = d.workdir / "marker"
        d.start()
        c = d.client()
        run_marker_rule(c, marker, 5)
        first = int(c.ok('SCHEDULE SET k.a "every 1 hour"'))
        wait_until(lambda: read_lines(marker) or None, "the first run to start")
        run = d.current
        assert run is not None
        os.kill(run.pid, signal.SIGUSR1)
        wait_until(lambda: c.stat()["compression"] == "success" or None, "the compaction")
        assert c.get("k.a") == ("triggered", first)  # the run is still in progress
        d.kill()
        d.start()
        lines = wait_until(lambda: read_lines(marker)[1:] or None, "the re-run to start")
        assert lines == [f"S k.a {first} 2"], f"first occurrence {first}; runs {lines}"


def test_missed_occurrences_of_an_interrupted_job_are_counted(tmp_path: Path) -> None:
    """Down 3.5 s after a kill during a run of ``every 1 second``: the missed are counted.

    SPEC §8: ``occurrences_missed`` counts every occurrence that fell due while the
    daemon was down, whatever the policy then did with it; the interrupted run is re-run
    and ``misfire=once`` runs one catch-up, due while the daemon was down.
    """
    with daemon(tmp_path / "d", {"database": {"compression_interval": 0}}) as d:
        marker = d.workdir / "marker"
        d.start()
        c = d.client()
        run_marker_rule(c, marker, 1)
        first = int(c.ok('SCHEDULE SET k.a "every 1 second" misfire=once'))
        wait_until(lambda: read_lines(marker) or None, "the first run to start")
        assert c.get("k.a") == ("triggered", first)  # the run is still in progress
        d.kill()
        dead = now_ns()
        time.sleep(DOWNTIME)
        spawned = now_ns()
        d.start()
        lines = wait_until(
            lambda: read_lines(marker)[2:] or None, "the catch-up after the re-run", timeout=10
        )
        rerun, catch_up = read_lines(marker)[1], lines[0].split()
        assert rerun == f"S k.a {first} 2"
        assert dead < int(catch_up[2]) and catch_up[3] == "1", lines
        missed = int(d.client().stat()["occurrences_missed"])
        assert missed >= grid(first, SECOND, dead, spawned) >= 3, f"missed {missed}"


def test_interrupted_jobs_fail_keeps_a_schedule_recurring(tmp_path: Path) -> None:
    """``interrupted_jobs = "fail"``: the interrupted occurrence fails, the next ones run.

    The schedule has not ended (no ``limit``, no ``until``), so after the restart the job
    is planned at its next occurrence and runs there (SPEC §8: re-planned after each
    occurrence); the interrupted one is not run again.
    """
    config: dict[str, dict[str, str | bool | int | float | list[str]]] = {
        "database": {"compression_interval": 0},
        "scheduler": {"interrupted_jobs": "fail"},
    }
    with daemon(tmp_path / "d", config) as d:
        marker = d.workdir / "marker"
        d.start()
        c = d.client()
        run_marker_rule(c, marker, 1)
        first = int(c.ok('SCHEDULE SET k.a "every 1 second"'))
        wait_until(lambda: read_lines(marker) or None, "the first run to start")
        assert c.get("k.a") == ("triggered", first)  # the run is still in progress
        d.kill()
        d.start()
        lines = wait_until(lambda: read_lines(marker)[1:] or None, "a later run", timeout=6)
        due, attempt = lines[0].split()[2:]
        assert int(due) > first and attempt == "1", lines
