"""Paging of the manager's long lists: a row limit, a cursor, and where the next page starts.

A list stays a JSON list (operators script against it); a page that stops short of the end
says so in the ``X-Next-After`` response header, whose value is the ``after`` of the next page.
The cursor is a row's own key (a task's id, a VM's name), not an offset: rows added or removed
between two requests move no other row across a page boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Query, Response

NEXT_AFTER_HEADER = "X-Next-After"
MAX_LIMIT = 1000

TaskLimit = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description="at most this many tasks (default 100)")
]
VmLimit = Annotated[
    int | None,
    Query(ge=1, le=MAX_LIMIT, description="at most this many VMs; default: all of them"),
]
TaskCursor = Annotated[
    int | None,
    Query(ge=1, le=2**63 - 1, description="continue after this task id (the list is newest first)"),
]
VmCursor = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="continue after this VM name (by name)"),
]
# The list routes' success, with the header that says a next page exists.
PAGED: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            NEXT_AFTER_HEADER: {
                "description": "more rows follow: pass this as `after` for the next page "
                "(absent on the last page)",
                "schema": {"type": "string"},
            }
        }
    }
}

T = TypeVar("T")


def page(
    response: Response, rows: Sequence[T], limit: int | None, key: Callable[[T], Any]
) -> list[T]:
    """The first ``limit`` of ``rows`` (fetched one beyond the limit, to know whether more
    exist), with the next page's cursor in the header when they do."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    response.headers[NEXT_AFTER_HEADER] = str(key(rows[limit - 1]))
    return list(rows[:limit])
