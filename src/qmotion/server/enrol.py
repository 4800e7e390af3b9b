"""Enrolment of new hosts: one-time join tokens (``host add``) and the join they are spent on.

A join token names the host it admits, its address and its agent's port, and is good once,
for a limited time; only its SHA-256 is kept. The join signs the host's request for its own
key (the name and the address from the token, never from the request) and records the host,
down until its agent first answers: the manager's next refresh then reads its facts and
certifies its migration addresses too, as for any host.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from qmotion.api.enrol import (
    CertRotation,
    JoinAnswer,
    JoinRequest,
    JoinTokenCreate,
    JoinTokenOut,
)
from qmotion.client.enrol import fingerprint
from qmotion.client.errors import ClientError
from qmotion.pki import ClusterCA, ManagerTls, PkiError
from qmotion.server.access import digest
from qmotion.server.db import (
    ACTIVE_TASK_STATES,
    Database,
    Host,
    HostMaintenance,
    JoinToken,
    Task,
    utcnow,
)
from qmotion.server.errors import Conflict, Invalid, NotFound
from qmotion.server.inventory import Inventory

JOIN_PREFIX = "qmj_"


class Enrolment:
    def __init__(
        self, db: Database, ca: ClusterCA | None, manager_tls: ManagerTls | None = None
    ) -> None:
        self.db, self.ca, self.manager_tls = db, ca, manager_tls

    def _ca(self) -> ClusterCA:
        if self.ca is None:
            raise Conflict(
                "this manager runs --insecure (no cluster CA): hosts cannot join; "
                "register them with POST /v1/hosts"
            )
        return self.ca

    def ca_pem(self) -> str:
        return self._ca().cert_pem

    def create_token(self, req: JoinTokenCreate, manager_url: str) -> JoinTokenOut:
        ca = self._ca()
        secret = JOIN_PREFIX + secrets.token_urlsafe(32)
        expires = utcnow() + timedelta(seconds=req.ttl_s)
        with self.db.session() as s:
            if s.scalars(select(Host).where(Host.name == req.name)).first() is not None:
                raise Conflict(f"host {req.name} is already in the cluster", field="name")
            s.add(
                JoinToken(
                    digest=digest(secret),
                    host=req.name,
                    address=str(req.address),
                    port=req.port,
                    migration=[str(a) for a in req.migration_addresses],
                    expires_at=expires,
                )
            )
        ca_hash = fingerprint(ca.cert_pem)
        return JoinTokenOut(
            host=req.name,
            token=secret,
            expires_at=expires,
            ca_hash=ca_hash,
            command=(
                f"qmotion agent join {manager_url} --name {req.name} --token {secret} "
                f"--ca-hash {ca_hash}"
            ),
        )

    def join(self, req: JoinRequest) -> JoinAnswer:
        """Spends the token: signs the host's key and records the host (down until its agent
        answers). Refused, changing nothing, for a token unknown, used or expired."""
        ca = self._ca()
        # With the manager's client certificate the agent's control API is mutual TLS and
        # no token exists; without (tests), a token as for hosts registered by hand.
        mtls = self.manager_tls is not None
        agent_token = None if mtls else secrets.token_urlsafe(32)
        try:
            with self.db.session() as s:
                tok = s.scalars(
                    select(JoinToken).where(JoinToken.digest == digest(req.token))
                ).first()
                if tok is None or tok.used_at is not None or tok.expires_at <= utcnow():
                    why = "unknown" if tok is None else "used" if tok.used_at else "expired"
                    raise Invalid(
                        f"join token {why}: ask for a new one (`qmotion host add`)", field="token"
                    )
                try:
                    cert = ca.sign_host(req.csr_pem, tok.host, [tok.address])
                except PkiError as exc:
                    raise Invalid(str(exc), field="csr_pem", host=tok.host) from exc
                # Spent by one statement that only an unspent token passes: of two joins with
                # one token at once, exactly one gets through (the other reads "used").
                spent = s.execute(
                    update(JoinToken)
                    .where(JoinToken.id == tok.id, JoinToken.used_at.is_(None))
                    .values(used_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
                if getattr(spent, "rowcount", 0) != 1:
                    raise Invalid(
                        "join token used: ask for a new one (`qmotion host add`)", field="token"
                    )
                # After the token is spent: a join with the same token reads "used", never this.
                if s.scalars(select(Host).where(Host.name == tok.host)).first() is not None:
                    raise Conflict(f"host {tok.host} is already in the cluster", host=tok.host)
                s.add(
                    Host(
                        name=tok.host,
                        agent_url=f"{'https' if mtls else 'http'}://{tok.address}:{tok.port}",
                        token=agent_token or "",
                        state="down",
                        facts=None,
                        approved=[tok.address, *(tok.migration or [])],
                    )
                )
                return JoinAnswer(
                    name=tok.host,
                    address=tok.address,
                    port=tok.port,
                    ca_pem=ca.cert_pem,
                    cert_pem=cert,
                    manager_ca_pem=self.manager_tls.clients_ca_pem if self.manager_tls else None,
                    agent_token=agent_token,
                )
        except IntegrityError as exc:
            # Two tokens for one name, spent at once: the second finds the host recorded.
            raise Conflict("a host of that name joined meanwhile", field="token") from exc

    def remove_host(self, name: str) -> None:
        """Forget a host: refused while a VM lives there or a task moves one to or from it
        (evacuate it first: ``host maintenance enter``). Its agent keeps running until it
        is uninstalled; its certificate stays valid until it expires."""
        with self.db.session() as s:
            host = s.scalars(select(Host).where(Host.name == name)).first()
            if host is None:
                raise NotFound(f"no host {name}", host=name)
            vms = sorted(v.name for v in host.vms)
            if vms:
                raise Conflict(
                    f"host {name} still has VMs ({', '.join(vms)}): move them first "
                    "(`qmotion host maintenance enter`)",
                    host=name,
                )
            busy = s.scalars(
                select(Task.id).where(
                    Task.state.in_(ACTIVE_TASK_STATES),
                    or_(Task.source == name, Task.destination == name),
                )
            ).first()
            if busy is not None:
                raise Conflict(f"task {busy} is moving a VM to or from {name}", host=name)
            maintenance = s.get(HostMaintenance, name)
            if maintenance is not None:
                s.delete(maintenance)
            s.delete(host)

    def rotate(self, inventory: Inventory) -> list[CertRotation]:
        """A new certificate for every host that answers (its name, management and
        migration addresses, a fresh validity; the key stays on the host). A host that is
        down or fails is reported, never skipped silently; run it again once it is back."""
        self._ca()
        with self.db.session() as s:
            hosts = [(h.name, h.agent_url, h.token) for h in s.scalars(select(Host))]
        out = []
        for name, url, token in sorted(hosts):
            try:
                with inventory.agents.client(url, token, timeout_s=30) as client:
                    inventory.issue_certificate(client, name, client.host())
                    ends = client.host().cert_not_after
                out.append(CertRotation(host=name, not_after=ends, error=None))
            except (ClientError, PkiError) as exc:
                out.append(CertRotation(host=name, not_after=None, error=str(exc)))
        return out
