"""A stand-in for runner kinds this version of ztick-tw does not implement yet."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ztick_tw.model import RunnerKind
from ztick_tw.runners.base import Execution, IRunner, Outcome


@implementer(IRunner)
class UnavailableRunner:
    """Fails every execution at once with a reason naming the missing runner kind."""

    def __init__(self, kind: RunnerKind) -> None:
        self.kind = kind
        self.reason = f"the {kind.wire} runner is not implemented in this version of ztick-tw"

    @property
    def running(self) -> int:
        """Always 0: nothing is ever started."""
        return 0

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Return an already-fired Deferred with a failed ``Outcome``."""
        return succeed(Outcome(False, self.reason))

    def stop(self, grace: float) -> Deferred[None]:
        """Nothing runs, so stopping is immediate."""
        return succeed(None)
