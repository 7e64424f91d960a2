"""The descriptor budget: connections and runs must fit the process's descriptor limit.

At startup the soft limit is raised to the hard one, then ``[controller]
max_connections + [scheduler] max_concurrent_runs x 3 + 64`` (+ the REST listener's
``[http] max_connections``) must fit it: a ``max_connections`` left at its default is
lowered to what fits, an explicit one that cannot fit is a ``StartupError``.
"""

from __future__ import annotations

import contextlib
import resource

from twisted.logger import Logger

from ztick_tw.config import Config, ControllerConfig
from ztick_tw.runners.process import (
    FDS_PER_RUN,
)

log = Logger(namespace="ztick_tw")


class StartupError(Exception):
    """A known reason the daemon cannot start; its message is one line for stderr."""


def raise_descriptor_limit() -> int | None:
    """Let the daemon hold as many descriptors as the hard limit allows.

    Returns the soft limit now in effect, ``None`` when it is unlimited.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


#: Descriptors kept for everything but connections and runs: stdio, the logfile (and a
#: compaction's temporary and replaced files), listeners, the reactor's wakers, the
#: thread pool, the network runners' connections.
DESCRIPTOR_RESERVE = 64


def fit_descriptor_limit(
    limit: int | None,
    max_connections: int,
    max_concurrent_runs: int,
    *,
    connections_set: bool,
    fds_per_run: int = FDS_PER_RUN,
    reserve: int = DESCRIPTOR_RESERVE,
    rest_connections: int = 0,
) -> int:
    """The ``max_connections`` to serve with, so connections and runs fit in ``limit``.

    ``max_connections + max_concurrent_runs * fds_per_run + reserve`` (+ the REST
    listener's ``rest_connections``, kept for it) must not exceed the descriptor limit.
    When it does, a ``max_connections`` left at its default (``connections_set``
    false) is lowered to what fits, with a warning; one set in the config is refused
    (``StartupError``), as is a ``max_concurrent_runs`` that leaves no room for a
    single connection.
    """
    if limit is None:
        return max_connections
    runs = max_concurrent_runs * fds_per_run
    room = limit - reserve - rest_connections - runs
    if max_connections <= room:
        return max_connections
    if connections_set or room < 1:
        raise StartupError(
            f"the descriptor limit ({limit}, ulimit -n) cannot hold [controller]"
            f" max_connections ({max_connections}) + [scheduler] max_concurrent_runs"
            f" ({max_concurrent_runs}) x {fds_per_run} + {reserve} for the daemon itself"
            + (f" + [http] max_connections ({rest_connections})" if rest_connections else "")
            + f" = {max_connections + runs + reserve + rest_connections}: lower"
            f" [controller] max_connections (at most {max(room, 0)} here) or [scheduler]"
            " max_concurrent_runs, or raise the limit (LimitNOFILE= under systemd)"
        )
    log.warn(
        "[controller] max_connections lowered from its default {default} to {fits}: the"
        " descriptor limit is {limit}, and {runs} ({max_runs} concurrent runs x {per_run})"
        " + {reserve} are kept for runs and the daemon; raise the limit, or set"
        " max_connections to at most {fits} to silence this",
        default=max_connections,
        fits=room,
        limit=limit,
        runs=runs,
        max_runs=max_concurrent_runs,
        per_run=fds_per_run,
        reserve=reserve + rest_connections,
    )
    return room


def max_connections_set(config: Config) -> bool:
    """Whether ``[controller] max_connections`` was written in the config file.

    The config does not record which keys were written, so a value equal to the
    built-in default counts as not written.
    """
    return config.controller.max_connections != ControllerConfig().max_connections
