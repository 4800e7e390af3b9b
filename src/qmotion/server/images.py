"""The image library in the manager: images a host's agent checked and copied, VM disks.

An image is recorded once its agent copied it whole; a VM made from one gets a full copy on
the datastore asked for (see qmotion.agent.vms.images)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qmotion.api.errors import ErrorBody, ErrorDetail
from qmotion.api.server import ImageImport, ImageOut
from qmotion.api.storage import ImageImportRequest, ImageInfo
from qmotion.api.vm import Disk
from qmotion.client.agent import AgentClient
from qmotion.client.errors import error_for
from qmotion.server.agents import AgentConnector, agent_errors
from qmotion.server.db import Database, Host, Image
from qmotion.server.errors import Conflict, Invalid

T = TypeVar("T")


class AgentCalls(Protocol):
    """How the library reaches a host's agent: the inventory's ``call`` and its connector
    (the inventory makes VMs from images, so it imports this module, not the other way
    round)."""

    agents: AgentConnector

    def call(
        self,
        host: Host,
        fn: Callable[[AgentClient], T],
        vm: str | None = None,
        timeout_s: float = 120.0,
    ) -> T: ...


def image_out(row: Image) -> ImageOut:
    return ImageOut(
        name=row.name,
        datastore=row.datastore,
        path=row.path,
        format=row.format,
        virtual_size=row.virtual_size,
        allocated_bytes=row.allocated_bytes,
        source=row.source,
        host=row.host,
        created_at=row.created_at,
    )


def _datastores(host: Host) -> dict[str, bool]:
    """The host's datastores: name -> marked shared."""
    return {d["name"]: bool(d.get("shared")) for d in (host.facts or {}).get("datastores", ())}


class ImageLibrary:
    def __init__(self, db: Database, inventory: AgentCalls) -> None:
        self.db, self.inventory = db, inventory

    def list(self) -> list[ImageOut]:
        with self.db.session() as s:
            return [image_out(r) for r in s.scalars(select(Image).order_by(Image.name))]

    def _host_for(self, name: str, datastore: str | None) -> tuple[Host, str]:
        """An up host that has the datastore (the first shared one when none is named), as a
        detached copy; refused, naming the field, for a name taken or no such host."""
        with self.db.session() as s:
            if s.scalars(select(Image).where(Image.name == name)).first() is not None:
                raise Conflict(f"an image named {name!r} exists", field="name")
            hosts = [h for h in s.scalars(select(Host).order_by(Host.name)) if h.state == "up"]
            if datastore is None:
                shared = sorted({n for h in hosts for n, sh in _datastores(h).items() if sh})
                if not shared:
                    raise Invalid(
                        "no datastore is shared by the hosts: name one with --datastore",
                        field="datastore",
                    )
                datastore = shared[0]
            host = next((h for h in hosts if datastore in _datastores(h)), None)
            if host is None:
                raise Invalid(f"no host that is up has datastore {datastore!r}", field="datastore")
            return Host(name=host.name, agent_url=host.agent_url, token=host.token), datastore

    def import_image(self, req: ImageImport) -> ImageOut:
        """Checked and copied by the agent of an up host that has the datastore (a shared
        one when none is named); recorded once the copy is complete."""
        host_copy, datastore = self._host_for(req.name, req.datastore)
        agent_req = ImageImportRequest(file=req.file, name=req.name, datastore=datastore)
        info = self.inventory.call(host_copy, lambda c: c.import_image(agent_req), timeout_s=3600)
        return self._record(req.name, info, req.file, host_copy.name)

    async def upload(
        self, name: str, datastore: str | None, body: AsyncIterator[bytes], client: str
    ) -> ImageOut:
        """An image from the caller's machine, streamed through to the chosen host (never
        held here), checked and imported there; recorded once the host has it whole."""
        host, ds = await asyncio.to_thread(self._host_for, name, datastore)
        put = self.inventory.agents.stream_put(
            host.agent_url, host.token, f"/v1/images/{name}/upload", {"datastore": ds}
        )
        with agent_errors(host.name):
            resp = await put(body)
            if resp.status_code >= 400:
                try:
                    detail = ErrorBody.model_validate_json(resp.content).error
                except ValidationError:
                    detail = ErrorDetail(code="http_error", message=resp.text[:500])
                raise error_for(resp.status_code, detail)
        info = ImageInfo.model_validate_json(resp.content)
        return await asyncio.to_thread(self._record, name, info, f"upload from {client}", host.name)

    def _record(self, name: str, info: ImageInfo, source: str, host: str) -> ImageOut:
        try:
            with self.db.session() as s:
                row = Image(
                    name=name,
                    datastore=info.datastore,
                    path=info.path,
                    format=info.format,
                    virtual_size=info.virtual_size,
                    allocated_bytes=info.allocated_bytes,
                    source=source,
                    host=host,
                )
                s.add(row)
                s.flush()
                return image_out(row)
        except IntegrityError as exc:
            raise Conflict(f"an image named {name!r} exists", field="name") from exc


def find_image(s: Session, name: str) -> Image:
    row = s.scalars(select(Image).where(Image.name == name)).first()
    if row is None:
        # A request naming what does not exist: refused as invalid input, nothing changed.
        known = ", ".join(s.scalars(select(Image.name))) or "none"
        raise Invalid(f"no image named {name!r} (images: {known})", field="image")
    return row


def image_disk(
    s: Session, host: Host, vm: str, image: str, datastore: str, size_mib: int | None
) -> Disk:
    """The boot disk of a VM made from ``image``: a full qcow2 copy on ``datastore``, grown to
    ``size_mib`` (never smaller than the image). Refused, naming the field, when the host
    cannot reach the image or the datastore."""
    row = find_image(s, image)
    have = _datastores(host)
    for ds, field in ((row.datastore, "image"), (datastore, "disk.datastore")):
        if ds not in have:
            raise Conflict(
                f"host {host.name} does not reach datastore {ds}"
                + (f" (where image {image} is)" if field == "image" else ""),
                field=field,
                host=host.name,
            )
    size = row.virtual_size if size_mib is None else size_mib << 20
    if size < row.virtual_size:
        raise Invalid(
            f"disk size {size_mib} MiB is smaller than image {image} "
            f"({row.virtual_size >> 20} MiB)",
            field="disk.size_mib",
        )
    return Disk(
        datastore=datastore,
        path=f"{vm}/disk0.qcow2",
        format="qcow2",
        create_size=size,
        create_from=f"{row.datastore}:{row.path}",
        bootable=True,
    )
