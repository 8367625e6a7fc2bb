"""Reading tapd's JSON log while tapd is still writing it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def events(path: Path) -> list[dict[str, Any]]:
    """Every complete event in the log at ``path``.  The last line may be
    half written; anything else that is not a JSON object (a line tapd's
    interpreter wrote to stderr itself) is skipped, not fatal: the caller
    waits for an event, and other tests judge what tapd prints."""
    found = []
    for line in path.read_text().split("\n")[:-1]:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            found.append(event)
    return found
