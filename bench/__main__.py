"""``python -m bench``: run the ztick-tw benchmarks, print the table, save the results.

Every scenario starts its own daemon(s) (``python -m ztick_tw -c FILE``) on a free
127.0.0.1 port in a temporary directory, and stops them.  The whole run is bounded by
``--time-limit``; a scenario that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import Context
from bench.daemon import BenchError, kill_all
from bench.machine import ForeignLoad, busy_percent, describe, speed_probe
from bench.report import Metric, merge_results, save_json, table, write_docs
from bench.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
DOCS = ROOT / "docs" / "benchmarks.md"


#: Machine-wide CPU use (percent of all cores) before a scenario above which it warns.
NOISY_PERCENT = 10.0


class OutOfTime(BenchError):
    """The whole run went over ``--time-limit``."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise OutOfTime("the benchmark run went over its --time-limit")


def wait_quiet(limit: float) -> float:
    """Machine-wide busy percent, after waiting up to ``limit`` s for it to drop."""
    deadline = time.perf_counter() + limit
    busy = busy_percent(1.0)
    while busy > NOISY_PERCENT and time.perf_counter() < deadline:
        busy = busy_percent(1.0)
    return round(busy, 1)


def run_scenario(
    name: str, ctx: Context, args: argparse.Namespace, background: dict[str, float]
) -> tuple[float, list[Metric]]:
    """Run one scenario; again (up to ``--retries`` times) if other load disturbed it.

    Returns the CPU share other processes took during the kept attempt (the least
    disturbed one) and its figures.
    """
    best: tuple[float, list[Metric]] | None = None
    for attempt in range(1 + args.retries):
        background[name] = wait_quiet(args.wait_quiet)
        if background[name] > NOISY_PERCENT:
            print(
                f"  WARNING: the machine was {background[name]:.0f}% busy before this"
                " scenario (other processes); its figures may be off",
                file=sys.stderr,
            )
        t = time.perf_counter()
        load = ForeignLoad()
        try:
            found = SCENARIOS[name](ctx)
        finally:
            used = round(load.stop(), 1)
        print(
            f"[{name}] done in {time.perf_counter() - t:.1f} s; other processes used"
            f" {used:.0f}% of the machine meanwhile",
            file=sys.stderr,
        )
        if best is None or used < best[0]:
            best = (used, found)
        if used <= NOISY_PERCENT:
            break
        if attempt < args.retries:
            print(f"[{name}] disturbed by other load: measuring it again", file=sys.stderr)
    assert best is not None
    return best


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark ztick-tw against the targets of docs/benchmarks.md.",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these scenarios (repeat or comma-separate): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller loads, one run each (about 2 minutes)"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"replace the generated block of {DOCS.relative_to(ROOT)} with these results;"
        " with --only, merge them into the newest complete results file of the same mode"
        " (or --base FILE) first",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="FILE",
        help="with --only and --write-docs: the complete results file to merge into",
    )
    parser.add_argument(
        "--from-results",
        nargs="?",
        const=str(RESULTS),
        default=None,
        metavar="FILE",
        help="with --write-docs: render the docs from a results file of a full run"
        " (default bench/results/latest.json), run nothing",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds (default 900, quick 240)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the daemons' directories (logs, logfiles)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each scenario, wait up to this long for other processes to leave the"
        f" machine under {NOISY_PERCENT:.0f}%% busy (default 30, quick 0)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help=f"measure a scenario again (at most this many times) when other processes"
        f" used over {NOISY_PERCENT:.0f}%% of the machine during it; the least disturbed"
        " attempt is kept (default 1, quick 0)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    args.only = [name for item in args.only for name in item.split(",") if name]
    unknown = [name for name in args.only if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 30.0
    if args.retries is None:
        args.retries = 0 if args.quick else 1
    if args.base and not (args.write_docs and args.only and not args.from_results):
        parser.error("--base only goes with --only and --write-docs")
    if args.from_results and not args.write_docs:
        parser.error("--from-results only goes with --write-docs")
    return args


def complete_results(directory: Path, quick: bool) -> Path | None:
    """The newest results file in ``directory`` of a complete, error-free run of this mode."""
    for path in sorted(directory.glob("*.json"), reverse=True):
        if path.name == RESULTS.name:
            continue
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if bool(saved.get("quick")) == quick and not saved.get("only") and not saved.get("errors"):
            return path
    return None


def merge_into_docs(args: argparse.Namespace, results: dict[str, Any], archive: Path) -> int:
    """``--only ... --write-docs``: merge this run into a complete one, then write the docs."""
    kind = "quick" if args.quick else "full"
    base_path = Path(args.base) if args.base else complete_results(RESULTS.parent, args.quick)
    if base_path is None:
        print(
            f"not writing {DOCS}: no results file of a complete {kind} run in"
            f" {RESULTS.parent} to merge into (run all scenarios with --write-docs)",
            file=sys.stderr,
        )
        return 2
    base = json.loads(base_path.read_text())
    if base.get("only") or base.get("errors") or bool(base.get("quick")) != args.quick:
        print(
            f"not writing {DOCS}: {base_path} is not a complete, error-free {kind} run",
            file=sys.stderr,
        )
        return 2
    merged = merge_results(base, results, list(SCENARIOS), base_path.name, archive.name)
    merged_path = archive.with_name(archive.name.replace("-only.json", "-merged.json"))
    save_json(merged_path, merged)
    save_json(RESULTS, merged)
    write_docs(DOCS, merged)
    print(
        f"updated {DOCS}: {', '.join(args.only)} from this run, the rest from {base_path};"
        f" merged results in {merged_path} and {RESULTS}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name, fn in SCENARIOS.items():
            print(f"{name:12} {(fn.__doc__ or '').strip()}")
        return 0
    if args.from_results:
        source = Path(args.from_results)
        saved = json.loads(source.read_text())
        if saved.get("only") or saved.get("errors"):
            print(
                f"python -m bench: {source} is from a partial or failed run"
                f" (only: {saved.get('only')}, errors: {saved.get('errors')}); not writing docs",
                file=sys.stderr,
            )
            return 2
        write_docs(DOCS, saved)
        print(f"wrote {DOCS} from {source}")
        return 0

    names = args.only or list(SCENARIOS)
    limit = args.time_limit or (240.0 if args.quick else 900.0)
    root = Path(tempfile.mkdtemp(prefix="ztick-bench-"))
    ctx = Context(quick=args.quick, root=root, repeats=1 if args.quick else 3)
    metrics: list[Metric] = []
    errors: dict[str, str] = {}
    background: dict[str, float] = {}
    foreign: dict[str, float] = {}
    speed: dict[str, float] = {}
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    machine: dict[str, Any] = {}
    try:
        machine = describe(root)
        for name in names:
            print(f"[{name}] {(SCENARIOS[name].__doc__ or '').strip()}", file=sys.stderr)
            speed[name] = round(speed_probe(), 3)
            print(f"[{name}] speed probe: {speed[name]:.3f} s", file=sys.stderr)
            try:
                used, found = run_scenario(name, ctx, args, background)
            except OutOfTime:
                raise
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                print(f"[{name}] ERROR: {errors[name]}", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                continue
            foreign[name] = used
            # Merging reruns into a full run goes by the registry's name: every figure
            # carries the name of the scenario that measured it.
            metrics += [m if m.scenario == name else replace(m, scenario=name) for m in found]
    except OutOfTime as e:
        errors["(run)"] = str(e)
        print(f"ERROR: {e}", file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        kill_all()
        if args.keep:
            print(f"daemon directories kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - started

    results: dict[str, Any] = {
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "only": args.only,
        "seconds": round(seconds, 1),
        "machine": machine,
        "metrics": [m.to_json() for m in metrics],
        "errors": errors,
        "background_busy_percent": background,
        "foreign_busy_percent": foreign,
        "speed_probe_seconds": speed,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "quick" if args.quick else "full"
    archive = RESULTS.with_name(f"{stamp}-{kind}{'-only' if args.only else ''}.json")
    save_json(archive, results)
    save_json(RESULTS, results)
    print()
    print(table(metrics, markdown=False))
    for name, error in errors.items():
        print(f"ERROR in {name}: {error}")
    print(f"\n{len(metrics)} figures in {seconds:.0f} s; results in {RESULTS} and {archive}")
    if args.write_docs:
        if errors:
            print(f"not writing {DOCS}: some scenarios failed", file=sys.stderr)
        elif args.only:
            return merge_into_docs(args, results, archive)
        else:
            write_docs(DOCS, results)
            print(f"updated {DOCS}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
