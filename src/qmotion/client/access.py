"""The typed client's calls about access: who am I, users, their tokens, the audit log."""

from __future__ import annotations

from qmotion.api.access import (
    AuditEntry,
    Role,
    TokenCreate,
    TokenCreated,
    TokenOut,
    UserCreate,
    UserOut,
    WhoAmI,
)
from qmotion.client.base import BaseClient, dump

NEXT_HEADER = "X-Next-After"


class AccessCalls(BaseClient):
    def whoami(self) -> WhoAmI:
        return self.call(WhoAmI, "GET", "/v1/whoami")

    def add_user(self, name: str, role: Role) -> UserOut:
        return self.call(UserOut, "POST", "/v1/users", json=dump(UserCreate(name=name, role=role)))

    def users(self) -> list[UserOut]:
        return self.call(list[UserOut], "GET", "/v1/users")

    def remove_user(self, name: str) -> None:
        self.request("DELETE", f"/v1/users/{name}")

    def create_token(self, user: str, label: str = "") -> TokenCreated:
        req = TokenCreate(label=label)
        return self.call(TokenCreated, "POST", f"/v1/users/{user}/tokens", json=dump(req))

    def tokens(self, user: str) -> list[TokenOut]:
        return self.call(list[TokenOut], "GET", f"/v1/users/{user}/tokens")

    def revoke_token(self, token_id: int) -> TokenOut:
        return self.call(TokenOut, "DELETE", f"/v1/tokens/{token_id}")

    def audit(
        self, *, limit: int = 100, after: int | None = None, user: str | None = None
    ) -> tuple[list[AuditEntry], int | None]:
        """One page, newest first, and the ``after`` of the next page (None: no more)."""
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        if user is not None:
            params["user"] = user
        resp = self.request("GET", "/v1/audit", params=params)
        page = [AuditEntry.model_validate(e) for e in resp.json()]
        cursor = resp.headers.get(NEXT_HEADER)
        return page, int(cursor) if cursor else None
