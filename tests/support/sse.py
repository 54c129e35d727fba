"""Server-sent events as the HTTP API writes them, parsed for assertions."""

from __future__ import annotations

import json


def sse(body: str) -> list[tuple[str, dict]]:
    """(event, data) of each event of a text/event-stream body, in order."""
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out
