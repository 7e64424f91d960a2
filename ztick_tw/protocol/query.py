"""A ``QUERY`` answer produced in slices, so its size never sits in memory at once.

A ``QUERY`` over a million jobs is a million lines; built whole (with a 4 KB request id on
every line) it once took gigabytes.  A :class:`QueryStream` instead hands out the answer a
slice of a bounded number of bytes at a time, resuming its scan of the job index after the
last id it returned.  The protocol asks for the next slice only when its client has taken
the previous one and after other clients and timers had their turn.

Between slices the job table may change: a job that exists for the whole answer is listed
exactly once; one set or removed meanwhile may or may not be listed (as with Redis'
``SCAN``).  Jobs come in id order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ztick_tw.model import ShownStatus

#: ``scan(prefix, after, limit)``: up to ``limit`` jobs after ``after``, in id order.
Scan = Callable[[str, str | None, int], Sequence[tuple[str, ShownStatus, int]]]

#: At most this many jobs are read from the index per scan call.
MAX_SCAN = 4096

#: What a line costs besides the request id and the job id: " planned -1234...\n".
_LINE_OVERHEAD = 32


class QueryStream:
    """The answer to one ``ID QUERY [prefix]``: its lines, then ``ID OK``, in slices."""

    __slots__ = ("_after", "_done", "_id_bytes", "_prefix", "_request_id", "_scan", "lines")

    def __init__(self, scan: Scan | None, request_id: str, prefix: str) -> None:
        """``scan`` ``None`` means nothing can match (a prefix outside the namespace)."""
        self._scan = scan
        self._request_id = request_id
        self._prefix = prefix
        self._after: str | None = None
        self._done = False
        self._id_bytes = len(request_id.encode())
        self.lines = 0  # job lines produced so far

    @property
    def done(self) -> bool:
        """Whether the final ``ID OK`` has been produced."""
        return self._done

    def next_slice(self, max_bytes: int) -> bytes:
        """The next lines of the answer: at least one, and at most one past ``max_bytes``.

        The slice that ends the answer carries ``ID OK`` and sets ``done``.
        """
        if self._done:
            return b""
        rid = self._request_id
        parts: list[str] = []
        size = 0
        scan = self._scan
        while scan is not None:
            # Estimate how many lines fit (most of a line is often the request id); a
            # batch that holds more than fits is cut, and the next slice resumes there.
            per_line = self._id_bytes + len(self._prefix) + _LINE_OVERHEAD
            want = max(1, min(MAX_SCAN, (max_bytes - size) // per_line))
            found = scan(self._prefix, self._after, want)
            for job_id, status, execution_ns in found:
                line = f"{rid} {job_id} {status.wire} {execution_ns}\n"
                parts.append(line)
                size += len(line)
                self._after = job_id
                self.lines += 1
                if size >= max_bytes:
                    return "".join(parts).encode()
            if len(found) < want:
                break  # the index has no more matches
        parts.append(f"{rid} OK\n")
        self._done = True
        return "".join(parts).encode()
