"""Wire models of enrolment: a one-time join token for a new host, and the host's join.

kubeadm's model: ``qmotion host add`` on the manager gives a token and the cluster CA's hash;
``qmotion agent join`` on the host pins the CA by that hash, sends a signing request for a key
made there (the key never leaves the host) and gets back its certificate and the credentials
the manager will call it with.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from qmotion.api.server import Address
from qmotion.api.vm import NAME_PATTERN, StrictModel


class JoinTokenCreate(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="the new host's name in the cluster")
    address: Address = Field(description="the host's IPv4 address the manager reaches it at")
    port: int = Field(default=8100, ge=1, le=65535, description="its agent's port")
    migration_addresses: list[Address] = Field(
        default_factory=list,
        max_length=8,
        description="its migration addresses: with the address, all its certificate may name",
    )
    ttl_s: int = Field(default=3600, ge=60, le=7 * 86400, description="how long it may be used")


class JoinTokenOut(BaseModel):
    host: str
    token: str = Field(description="one-time secret: shown once, stored only as a hash")
    expires_at: datetime
    ca_hash: str = Field(description="sha256 of the cluster CA certificate, to pin it")
    command: str = Field(description="what to run on the host")


class JoinRequest(StrictModel):
    token: str = Field(min_length=16, max_length=256, pattern=r"^[!-~]+$")
    csr_pem: str = Field(min_length=1, max_length=16384)


class JoinAnswer(BaseModel):
    name: str
    address: str
    port: int
    ca_pem: str
    cert_pem: str
    manager_ca_pem: str | None = Field(
        default=None,
        description="the CA of the manager's client certificate: the only callers the "
        "agent's control API (then HTTPS) accepts",
    )
    agent_token: str | None = Field(
        default=None,
        description="a bearer token the manager calls this agent with (None: by certificate)",
    )


class CertRotation(BaseModel):
    host: str
    not_after: datetime | None = Field(description="when its new certificate ends")
    error: str | None = Field(description="why it was not renewed (None: renewed)")
