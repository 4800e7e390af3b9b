"""The manager's enrolment routes: join tokens (admin), the join itself, host removal."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from pydantic import BaseModel

from qmotion.api.enrol import (
    CertRotation,
    JoinAnswer,
    JoinRequest,
    JoinTokenCreate,
    JoinTokenOut,
)
from qmotion.api.vm import NAME_PATTERN
from qmotion.server.enrol import Enrolment
from qmotion.server.inventory import Inventory

HostName = Annotated[str, Path(pattern=NAME_PATTERN)]


class CaOut(BaseModel):
    ca_pem: str


def install_enrol_routes(
    app: FastAPI, enrolment: Enrolment, inventory: Inventory, auth: list[Any]
) -> None:
    @app.post("/v1/cluster/rotate-certs", response_model=list[CertRotation], dependencies=auth)
    def rotate_certs() -> list[CertRotation]:
        """A new certificate for every host that answers; each host's outcome."""
        return enrolment.rotate(inventory)

    @app.post(
        "/v1/hosts/join-tokens", response_model=JoinTokenOut, status_code=201, dependencies=auth
    )
    def create_join_token(req: JoinTokenCreate, request: Request) -> JoinTokenOut:
        """A one-time token for a new host, and the command to run there."""
        return enrolment.create_token(req, str(request.base_url).rstrip("/"))

    @app.delete("/v1/hosts/{name}", status_code=204, dependencies=auth)
    def remove_host(name: HostName) -> None:
        """Forget a host with no VMs and no migration to or from it (409 otherwise)."""
        enrolment.remove_host(name)

    # No bearer token: a joining host has none yet. The CA is public; the join is
    # authorised by its one-time token, and the host checks the CA by the hash it was given.
    @app.get("/v1/join/ca", response_model=CaOut)
    def join_ca() -> CaOut:
        return CaOut(ca_pem=enrolment.ca_pem())

    @app.post("/v1/join", response_model=JoinAnswer)
    def join(req: JoinRequest) -> JoinAnswer:
        return enrolment.join(req)
