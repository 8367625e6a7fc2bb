"""structlog set up for tapd: one JSON object per line on stderr.

Events are named ``thing.action[.outcome]`` (``request.granted``,
``server.listening``) and carry the peer's uid/gid/pid and a request id, bound
once per connection.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(**bound: Any) -> Any:
    return structlog.get_logger("tapd").bind(**bound)
