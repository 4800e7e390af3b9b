"""One page of a manager's list, and the cursor of the page after it (``X-Next-After``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter

from qmotion.api.paging import NEXT_AFTER_HEADER
from qmotion.client.base import BaseClient

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """``items`` in the list's order; ``next_after``: the ``after`` that continues the list,
    None on its last page."""

    items: list[T]
    next_after: str | None


def get_page(client: BaseClient, item: type[T], path: str, **params: Any) -> Page[T]:
    """GET ``path`` with the parameters that are not None."""
    query = {k: v for k, v in params.items() if v is not None}
    resp = client.request("GET", path, params=query)
    adapter = TypeAdapter(item)
    return Page(
        items=[adapter.validate_python(x) for x in resp.json()],
        next_after=resp.headers.get(NEXT_AFTER_HEADER),
    )
