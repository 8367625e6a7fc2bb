"""structlog set up for tapd: one JSON object per line on stderr.

Events are named ``thing.action[.outcome]`` (``request.granted``,
``server.listening``) and carry the peer's uid/gid/pid and a request id, bound
once per connection.

When stderr is the journal, each line starts with its syslog priority in
systemd's ``<N>`` form, so that ``journalctl -p warning`` finds tapd's
warnings and errors; the JSON after it is the same as anywhere else.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO, TypeAlias

import structlog

#: what :func:`get` returns, and what its ``bind`` returns: the class
#: :func:`configure` installs (``make_filtering_bound_logger``) and structlog's
#: default before it runs
Logger: TypeAlias = structlog.typing.FilteringBoundLogger

#: structlog's level names as syslog priorities (<syslog.h>: LOG_CRIT 2,
#: LOG_ERR 3, LOG_WARNING 4, LOG_INFO 6, LOG_DEBUG 7)
PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

#: whether stderr is the journal, as found by the last :func:`configure`
_journal = False


def is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal's stream socket.

    systemd.exec(5): for a service whose stdout or stderr is connected to the
    journal, ``JOURNAL_STREAM`` holds that stream's device and inode numbers
    as ``DEV:INO``.  The variable is inherited by whatever the service runs,
    so only a match with the stream itself counts (sd-journal's
    ``sd_journal_stream_fd`` callers are told to check the same way).
    """
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def prefix(level: str) -> str:
    """What starts a line of this level on stderr: ``<N>`` in the journal
    (systemd's stream parser takes it as the line's priority, see
    ``SyslogLevelPrefix=`` in systemd.exec(5)), else nothing."""
    return f"<{PRIORITIES.get(level, 6)}>" if _journal else ""


class _Prefixed:
    """The JSON renderer, with the line's priority in front."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str, event: structlog.typing.EventDict) -> str:
        return prefix(str(event.get("level", "info"))) + str(self._json(logger, name, event))


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    global _journal
    out = stream or sys.stderr
    _journal = is_journal(out)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Prefixed(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get(**bound: Any) -> Logger:
    logger: Logger = structlog.get_logger("tapd").bind(**bound)
    return logger
