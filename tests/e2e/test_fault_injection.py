"""Fault injection: SIGKILL the real daemon at random moments, compactions included.

One daemon setup (logfile backend, ``fsync_on_persist = true``, a compaction every
second, ``interrupted_jobs = "fail"``) is killed with SIGKILL and restarted many times in
a row on the same logfile, while several client threads pipeline a steady stream of
SET, REMOVE, RULE SET and REMOVERULE on their own ids (see ``tests/e2e/faults.py``).
Some kills follow a SIGUSR1 closely enough to land inside the compaction it started;
30,000 ballast jobs make each compaction last long enough for that.

After every restart, over TCP (QUERY, LISTRULES, STAT):

- every id holds the value of its last request answered ``OK``, or the value of a
  request still unanswered at the kill: no acknowledged write is lost and nothing
  removed comes back; jobs keep their latest time (a due job's status may advance);
- the ballast is intact;
- no job ran twice (its shell rule appends ``$ZTICK_JOB_ID`` to a marker file), every
  ``executed`` job ran exactly once, and every job seen ``executed`` (or ``failed``)
  before a kill is still so afterwards;
- no ``<logfile>.compact.tmp`` is left once the daemon is up, before any compaction of
  its own started; a stale one (left by a kill, or planted) is removed and logged.

The seed (``ZTICK_FAULT_SEED``) drives every random choice but thread timing; it is
printed at the start and named in every failure.  ``ZTICK_FAULT_ROUNDS`` sets the number
of kills.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.daemon import Daemon, daemon, now_ns, quote, read_lines, wait_until
from tests.e2e.faults import DAY, ClientModel, Conn, KeyState, Op, Value, run_load

SEED = int(os.environ.get("ZTICK_FAULT_SEED") or random.SystemRandom().randrange(2**32))
ROUNDS = int(os.environ.get("ZTICK_FAULT_ROUNDS", "16"))
LOAD_THREADS = 4
#: How the rounds end, each as often (see ``Campaign.round``).
MODES = ("plain", "during", "after", "burst")
#: Jobs due at one instant in a burst round.
BURST = 40
SECOND = 1_000_000_000
BALLAST = 30_000
COMPACT_SUFFIX = ".compact.tmp"

CONFIG: dict[str, dict[str, str | bool | int | float | list[str]]] = {
    "database": {
        "persistence": "logfile",
        "fsync_on_persist": True,
        "compression_interval": 1,
    },
    "scheduler": {"interrupted_jobs": "fail", "shutdown_grace": 0.5},
}


@dataclass
class Kill:
    """How one round ended."""

    round_no: int
    mode: str  # one of MODES
    after: float = 0.0  # seconds of load before the kill
    stat_before: str = ""  # STAT compression just before the kill
    temp_after: bool = False  # <logfile>.compact.tmp existed right after the kill
    planted: bool = False  # a garbage .compact.tmp was put there before the restart

    def __str__(self) -> str:
        return (
            f"round {self.round_no}: {self.mode} kill after {self.after:.3f}s of load,"
            f" STAT compression {self.stat_before!r} just before it,"
            f" {COMPACT_SUFFIX} {'present' if self.temp_after else 'absent'} after it"
            + (", a garbage one planted" if self.planted else "")
        )


@dataclass
class Campaign:
    """The daemon, the client models and what the checks have seen so far."""

    d: Daemon
    rng: random.Random
    models: list[ClientModel] = field(default_factory=list)
    ballast: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: Due jobs seen ``executed`` or ``failed`` before some kill: (status, time).
    seen_finished: dict[str, tuple[str, int]] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    statuses_at_kills: Counter[str] = field(default_factory=Counter)
    idle_temp_checks: int = 0
    stale_removed: int = 0
    #: Statuses of the due jobs once all have finished after the last restart.
    final_statuses: Counter[str] = field(default_factory=Counter)

    @property
    def marker(self) -> Path:
        return self.d.workdir / "marker"

    @property
    def temp(self) -> Path:
        return Path(str(self.d.logfile) + COMPACT_SUFFIX)

    def fail(self, round_no: int, problems: list[str]) -> None:
        """Raise with the seed, the round, how the round's kill went and the problems."""
        if not problems:
            return
        kill = next((k for k in self.kills if k.round_no == round_no), None)
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise AssertionError(
            f"fault injection seed {SEED} (ZTICK_FAULT_SEED={SEED} to replay), after"
            f" {kill or f'round {round_no}'}:\n  {shown}{more}\n"
            f"daemon working directory: {self.d.workdir}"
        )

    # -- setup ------------------------------------------------------------------------

    def setup(self) -> None:
        """Start the daemon; set the rule of due jobs and the ballast."""
        self.d.start()
        with Conn(self.d.port) as conn:
            command = f"echo $ZTICK_JOB_ID >> {shlex.quote(str(self.marker))}; sleep 0.15"
            assert conn.call(f"RULE SET due d. shell {quote(command)}") == ["OK"]
            base = now_ns() + 30 * DAY
            self.ballast = {f"b.{i:06d}": ("planned", base + i) for i in range(BALLAST)}
            conn.set_many({job: ns for job, (_, ns) in self.ballast.items()})
        # One model per load thread, and one for the bursts of due jobs.
        self.models = [ClientModel(t) for t in range(LOAD_THREADS + 1)]
        self.modes = [MODES[i % len(MODES)] for i in range(ROUNDS)]
        self.rng.shuffle(self.modes)

    # -- one round --------------------------------------------------------------------

    def round(self, round_no: int) -> Kill:
        """Load from every thread, then SIGKILL at a moment the round's mode picks.

        ``plain``: at a random moment.  ``during``: inside a compaction that SIGUSR1
        started.  ``after``: shortly after such a compaction swapped the logfile (before
        the next one).  ``burst``: as a burst of jobs due at one instant starts running.
        """
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=run_load,
                args=(self.d.port, model, random.Random(self.rng.random()), stop),
                daemon=True,
            )
            for model in self.models[:LOAD_THREADS]
        ]
        kill = Kill(round_no, self.modes[round_no])
        started = time.monotonic()
        for thread in threads:
            thread.start()
        with Conn(self.d.port) as conn:
            stop.wait(self.rng.uniform(0.1, 1.3) if kill.mode == "plain" else 0.1)
            for job_id, (status, ns) in conn.query("d.").items():
                self.statuses_at_kills[status] += 1
                if status in ("executed", "failed"):
                    self.seen_finished[job_id] = (status, ns)
            if kill.mode in ("during", "after"):
                run = self.d.current
                assert run is not None
                os.kill(run.pid, signal.SIGUSR1)
                # This compaction (or the interval's) under way: a few hundred ms.
                wait_until_or_none(self.temp.exists, timeout=3.0, interval=0.001)
                if kill.mode == "during":
                    time.sleep(self.rng.uniform(0.0, 0.12))
                else:
                    wait_until_or_none(lambda: not self.temp.exists(), 5.0, interval=0.001)
                    time.sleep(self.rng.uniform(0.0, 0.4))
                kill.stat_before = conn.stat()["compression"]
            elif kill.mode == "burst":
                kill.stat_before = conn.stat()["compression"]
                due_in = self.burst(conn)
                time.sleep(max(0.0, due_in + self.rng.uniform(-0.005, 0.05)))
            else:
                kill.stat_before = conn.stat()["compression"]
            kill.after = time.monotonic() - started
            self.d.kill()
        kill.temp_after = self.temp.exists()
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
            assert not thread.is_alive(), f"seed {SEED} round {round_no}: a load thread hangs"
        self.kills.append(kill)
        return kill

    def burst(self, conn: Conn) -> float:
        """SET ``BURST`` jobs due at one instant (pipelined); seconds until it comes.

        The burst model records them like a load thread's requests.
        """
        model = self.models[LOAD_THREADS]
        due_ns = now_ns() + int(0.25 * SECOND)
        ops = []
        for _ in range(BURST):
            op = Op("SET", f"d.{model.thread}.{model.due_made}", due_ns)
            model.due_made += 1
            model.sent(op)
            ops.append((f"burst{model.due_made}", op))
        conn.send_lines(f"{rid} {op.request()}" for rid, op in ops)
        for rid, op in ops:
            model.answered(op, conn.read_answer(rid))
        return (due_ns - now_ns()) / SECOND

    # -- restart and checks ------------------------------------------------------------

    def restart(self, kill: Kill) -> Conn:
        """Restart on the same logfile; check that no stale ``.compact.tmp`` is left."""
        # The dead daemon's jobs run on; let them end so the marker only grows from now.
        self.d.wait_no_children()
        if not kill.temp_after and self.rng.random() < 0.2:
            self.temp.write_bytes(self.rng.randbytes(self.rng.randrange(1, 1 << 16)))
            kill.planted = True
        self.d.start()
        conn = Conn(self.d.port)
        # The file first, then STAT: "idle" means no compaction had started by the time
        # the file was looked at, so a file seen then was left over from before.
        temp_exists = self.temp.exists()
        status = conn.stat()["compression"]
        problems: list[str] = []
        if status == "idle":
            self.idle_temp_checks += 1
            if temp_exists:
                problems.append(f"{self.temp.name} is still there after the restart")
        if kill.temp_after or kill.planted:
            run = self.d.current
            assert run is not None

            def logged() -> bool:
                return any(
                    "removed" in line and COMPACT_SUFFIX in line
                    for line in run.output().splitlines()
                )

            if wait_until_or_none(logged, timeout=5.0):
                self.stale_removed += 1
            else:
                problems.append(f"the restart did not log removing the stale {self.temp.name}")
        self.fail(kill.round_no, problems)
        return conn

    def verify(self, round_no: int, conn: Conn) -> None:
        """Every id as acknowledged (or as a request unanswered at the kill), and more."""
        problems: list[str] = []
        rules = conn.rules()
        for model in self.models:
            problems.extend(model.problems)
            model.problems.clear()
            actual: dict[str, Value] = {}
            for prefix in model.job_prefixes():
                for job_id, (status, ns) in conn.query(prefix).items():
                    actual[job_id] = ns
                    if job_id.startswith("f.") and status != "planned":
                        problems.append(f"job {job_id} (due in a day or more) is {status}")
            for rule_id, rendering in rules.items():
                if rule_id.startswith(model.rule_prefix()):
                    actual[rule_id] = rendering
            for key in sorted(set(model.keys) | set(actual)):
                state = model.keys.get(key, KeyState())
                got = actual.get(key)
                if got not in state.allowed():
                    problems.append(describe(model.thread, key, state, got))
            model.rebase(actual)
        ballast = conn.query("b.")
        if ballast != self.ballast:
            lost = sorted(set(self.ballast) - set(ballast))
            changed = sorted(k for k in ballast if ballast[k] != self.ballast.get(k))
            problems.append(
                f"ballast damaged: {len(lost)} jobs lost (first {lost[:3]}),"
                f" {len(changed)} changed (first {[(k, ballast[k]) for k in changed[:3]]})"
            )
        problems.extend(self.check_runs(conn))
        if problems:
            problems.append(
                "load sessions ended by: "
                + "; ".join(f"thread {m.thread}: {m.ended_by}" for m in self.models)
            )
        self.fail(round_no, problems)

    def check_runs(self, conn: Conn) -> list[str]:
        """No job ran twice; ``executed`` ones ran once; finished ones stay finished."""
        problems: list[str] = []
        due = conn.query("d.")
        # Read after the QUERY: a job it showed executed has written its line already.
        runs = Counter(read_lines(self.marker))
        for job_id, count in runs.items():
            if count > 1:
                problems.append(
                    f"job {job_id} ran {count} times (now {due.get(job_id)}); with"
                    ' interrupted_jobs = "fail" a job runs at most once'
                )
        for job_id, (status, _) in due.items():
            if status == "executed" and runs[job_id] != 1:
                problems.append(f"job {job_id} is executed but ran {runs[job_id]} times")
        for job_id, seen in list(self.seen_finished.items()):
            got = due.get(job_id)
            if got is None:
                # Removed (the model check has made sure that was acknowledged or asked).
                del self.seen_finished[job_id]
            elif got != seen:
                problems.append(f"job {job_id} was seen {seen} before a kill, is now {got}")
        return problems

    def finish(self, conn: Conn) -> None:
        """Let every due job finish, check the runs once more, stop with SIGTERM."""
        seen: list[dict[str, tuple[str, int]]] = [{}]

        def settled() -> bool:
            seen[0] = conn.query("d.")
            return all(status in ("executed", "failed") for status, _ in seen[0].values())

        wait_until(
            settled,
            "every due job to finish after the last restart",
            timeout=20.0,
            interval=0.05,
            on_timeout=lambda: (
                f"seed {SEED}; unfinished: "
                + str({k: v for k, v in seen[0].items() if v[0] not in ("executed", "failed")})
            ),
        )
        self.fail(ROUNDS, self.check_runs(conn))
        self.final_statuses = Counter(status for status, _ in seen[0].values())


def wait_until_or_none(
    condition: Callable[[], bool], timeout: float, interval: float = 0.02
) -> bool:
    """Poll ``condition()`` until true or ``timeout`` s passed; whether it came true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def describe(thread: int, key: str, state: KeyState, got: Value) -> str:
    """One id's wrong value after a restart, in words."""
    kind = "rule" if key.startswith("r.") else "job"
    unanswered = f", unanswered at the kill: {state.pending}" if state.pending else ""
    if got is None:
        what = "an acknowledged write was lost"
    elif state.acked is None and got not in state.pending:
        what = "a removed (or never set) id came back"
    else:
        what = "it holds a value no request gave it last"
    return (
        f"thread {thread}, {kind} {key}: {what}: last answered OK -> {state.acked!r}"
        f"{unanswered}; after the restart: {got!r}"
    )


def test_sigkill_at_random_moments_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """SIGKILL under load, often inside a compaction, loses nothing acknowledged.

    ``ROUNDS`` kills in a row on one logfile.  After each restart every job and rule of
    every load thread holds the value of its last request answered OK (or of one of its
    requests unanswered at the kill), removed ones stay gone, the ballast is intact, no
    job ran twice, jobs seen ``executed`` before a kill stay ``executed`` without running
    again, and no stale ``.compact.tmp`` is left.  The kills did hit compactions in
    progress (the temporary file was there right after the kill), and running jobs.
    """
    print(f"fault injection seed {SEED} (ZTICK_FAULT_SEED to replay), {ROUNDS} rounds")
    started = time.monotonic()
    with daemon(tmp_path / "d", CONFIG) as d:
        campaign = Campaign(d, random.Random(SEED))
        campaign.setup()
        conn: Conn | None = None
        for round_no in range(ROUNDS):
            kill = campaign.round(round_no)
            conn = campaign.restart(kill)
            try:
                campaign.verify(round_no, conn)
            finally:
                if round_no < ROUNDS - 1:
                    conn.close()
        assert conn is not None
        with conn:
            campaign.finish(conn)
        assert d.stop() == 0
        tracebacks = [
            f"{run.stdout_path.name}/{run.stderr_path.name}"
            for run in d.runs
            if "Traceback" in run.output()
        ]

    kills = campaign.kills
    in_compaction = [k for k in kills if k.temp_after]
    stat_running = [k for k in kills if k.stat_before == "running"]
    acknowledged = sum(m.ops_ok for m in campaign.models)
    finals = campaign.final_statuses
    print(
        f"{len(kills)} kills in {time.monotonic() - started:.1f}s:"
        f" {len(in_compaction)} inside a compaction ({COMPACT_SUFFIX} left),"
        f" {len(stat_running)} right after STAT said running;"
        f" {acknowledged} requests acknowledged of {sum(m.ops_sent for m in campaign.models)};"
        f" due jobs before kills: {dict(campaign.statuses_at_kills)}; at the end: {dict(finals)};"
        f" stale temp files removed: {campaign.stale_removed};"
        f" idle-start temp checks: {campaign.idle_temp_checks}"
    )
    where = f"(seed {SEED}): " + "; ".join(str(k) for k in kills)
    assert tracebacks == [], f"the daemon logged tracebacks in {tracebacks} {where}"
    assert any(k.stat_before != "idle" for k in kills), (
        f"STAT compression stayed idle: no compaction ran although compression_interval = 1"
        f" and SIGUSR1 were used {where}"
    )
    assert in_compaction, f"no kill landed inside a compaction {where}"
    assert stat_running, f"no kill came right after STAT said compression running {where}"
    assert campaign.idle_temp_checks > 0, f"no restart was checked before a compaction {where}"
    assert acknowledged > 1000, f"only {acknowledged} requests were acknowledged {where}"
    executed = [s for s, _ in campaign.seen_finished.values() if s == "executed"]
    assert executed, f"no job was seen executed before a kill {where}"
    # Jobs running at a kill end failed (interrupted_jobs = "fail"): kills hit running jobs.
    assert finals["failed"] > 0, f"no kill interrupted a running job {where}"
