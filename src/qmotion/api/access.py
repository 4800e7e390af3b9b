"""Wire models of who may do what on the manager: users, their roles and tokens, the audit log.

Roles are ordered: a viewer reads; an operator also runs VMs, migrations, maintenance, DRS
and schedules; an admin also adds and removes hosts, manages users and tokens, changes cluster
settings and reads the audit log.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from qmotion.api.vm import NAME_PATTERN, StrictModel


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return ROLE_ORDER.index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


ROLE_ORDER = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)


class UserCreate(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    role: Role


class UserOut(BaseModel):
    name: str
    role: Role
    created_at: datetime
    tokens: int = Field(description="tokens not revoked")


class TokenCreate(StrictModel):
    label: str = Field(default="", max_length=64, description="what the token is for")


class TokenOut(BaseModel):
    id: int
    user: str
    label: str
    prefix: str = Field(description="the token's first characters, to tell tokens apart")
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="the secret: shown once, stored only as a hash")


class WhoAmI(BaseModel):
    user: str
    role: Role


class AuditEntry(BaseModel):
    id: int
    at: datetime
    user: str | None = Field(description="None: the caller gave no valid token")
    role: Role | None
    method: str
    path: str
    route: str | None = Field(description="the route's template, e.g. /v1/vms/{name}/migrate")
    status: int
    outcome: str = Field(description="ok, refused (4xx), denied (401/403) or failed (5xx)")
    client: str | None
    task_id: int | None = Field(description="the task the call started, if any")
