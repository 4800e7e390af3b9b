"""Typed client of a host agent's API."""

from __future__ import annotations

from qmotion.api.host import HostFacts, HostMetrics, TlsCsr, TlsInstall, TlsStatus
from qmotion.api.migration import (
    DirtyRateReport,
    DirtyRateRequest,
    IncomingRequest,
    IncomingResponse,
    MigrationStats,
    MigrationTune,
    OutgoingRequest,
    PathProbe,
    PathProbeRequest,
    PostcopyRecovery,
)
from qmotion.api.storage import (
    DiskCopy,
    DiskCopyRequest,
    DiskExport,
    DiskUsage,
    ImageImportRequest,
    ImageInfo,
    MirrorRequest,
    MirrorStatus,
    NbdMirrorRequest,
)
from qmotion.api.vm import StopRequest, VmInfo, VmSpec
from qmotion.client.base import BaseClient, dump


class AgentClient(BaseClient):
    def import_image(self, req: ImageImportRequest) -> ImageInfo:
        """Check an image file on the host and copy it into a datastore's library (slow:
        give the client a long timeout)."""
        return self.call(ImageInfo, "POST", "/v1/images", json=dump(req))

    def disks(self, name: str) -> list[DiskUsage]:
        return self.call(list[DiskUsage], "GET", f"/v1/vms/{name}/disks")

    def storage_move(self, name: str, req: MirrorRequest) -> MirrorStatus:
        return self.call(MirrorStatus, "POST", f"/v1/vms/{name}/storage-move", json=dump(req))

    def storage_move_check(self, name: str, req: MirrorRequest) -> MirrorStatus:
        """What starting the move would refuse (4xx), without starting it."""
        return self.call(MirrorStatus, "POST", f"/v1/vms/{name}/storage-move/check", json=dump(req))

    def storage_move_status(self, name: str) -> MirrorStatus:
        return self.call(MirrorStatus, "GET", f"/v1/vms/{name}/storage-move")

    def storage_move_step(self, name: str, step: str) -> MirrorStatus:
        """``step``: activate, pivot, release or abort."""
        return self.call(MirrorStatus, "POST", f"/v1/vms/{name}/storage-move/{step}")

    def host(self) -> HostFacts:
        return self.call(HostFacts, "GET", "/v1/host")

    def metrics(self) -> HostMetrics:
        return self.call(HostMetrics, "GET", "/v1/metrics")

    def list_vms(self) -> list[VmInfo]:
        return self.call(list[VmInfo], "GET", "/v1/vms")

    def define(self, spec: VmSpec) -> VmInfo:
        return self.call(VmInfo, "POST", "/v1/vms", json=dump(spec))

    def vm(self, name: str) -> VmInfo:
        return self.call(VmInfo, "GET", f"/v1/vms/{name}")

    def start(self, name: str) -> VmInfo:
        return self.call(VmInfo, "POST", f"/v1/vms/{name}/start")

    def suspend(self, name: str) -> VmInfo:
        return self.call(VmInfo, "POST", f"/v1/vms/{name}/suspend")

    def stop(self, name: str, *, force: bool = False, timeout_s: float = 30.0) -> VmInfo:
        req = StopRequest(force=force, timeout_s=timeout_s)
        return self.call(VmInfo, "POST", f"/v1/vms/{name}/stop", json=dump(req))

    def delete(
        self,
        name: str,
        *,
        force: bool = False,
        with_disks: bool = False,
        migration: str | None = None,
    ) -> None:
        """With ``migration``: only that migration's destination is removed (the agent refuses
        a VM that runs, or that did not arrive by it)."""
        params = {"force": str(force).lower(), "with_disks": str(with_disks).lower()}
        self.request("DELETE", f"/v1/vms/{name}", params=params | _of(migration))

    def export_disks(
        self, name: str, *, copy: bool = True, reader: str | None = None
    ) -> list[DiskExport]:
        """Hold the stopped VM on its host (no start there) and, with ``copy``, export its
        disks read-only (``reader``: the only host that may read them, on a TLS cluster)."""
        params = {"copy": str(copy).lower()} | ({"reader": reader} if reader else {})
        return self.call(list[DiskExport], "POST", f"/v1/vms/{name}/export", params=params)

    def unexport_disks(self, name: str, *, release: bool = True) -> None:
        """End the exports; with ``release`` also the hold on the VM."""
        self.request("DELETE", f"/v1/vms/{name}/export", params={"release": str(release).lower()})

    def copy_disk(self, req: DiskCopyRequest) -> DiskCopy:
        return self.call(DiskCopy, "POST", "/v1/disk-copies", json=dump(req))

    def remove_disk_copy(self, datastore: str, path: str) -> None:
        self.request("DELETE", "/v1/disk-copies", params={"datastore": datastore, "path": path})

    def console(self, name: str, tail_bytes: int = 65536) -> str:
        return self.request(
            "GET", f"/v1/vms/{name}/console", params={"tail_bytes": tail_bytes}
        ).text

    def incoming(self, req: IncomingRequest) -> IncomingResponse:
        return self.call(IncomingResponse, "POST", "/v1/migrations/incoming", json=dump(req))

    def incoming_check(self, req: IncomingRequest) -> None:
        """What preparing the destination would refuse (4xx), without preparing it."""
        self.request("POST", "/v1/migrations/incoming/check", json=dump(req))

    def disk_mirror(self, name: str, req: NbdMirrorRequest) -> MirrorStatus:
        """Shared-nothing: mirror every copied disk into the destination's exports."""
        return self.call(MirrorStatus, "POST", f"/v1/vms/{name}/migration/mirror", json=dump(req))

    def disk_mirror_status(self, name: str) -> MirrorStatus:
        return self.call(MirrorStatus, "GET", f"/v1/vms/{name}/migration/mirror")

    def keep_disks(self, name: str, *, migration: str | None = None) -> None:
        """Destination: the manager saw the VM run here; its copied disks (shared-nothing) are
        its own and, with ``migration``, that migration is confirmed here."""
        self.request("POST", f"/v1/vms/{name}/migration/keep-disks", params=_of(migration))

    def finish_migration(self, name: str, migration: str, *, wait_ms: int = 0) -> VmInfo:
        """Destination: the word that the source completed ``migration``: the paused
        destination runs (now, or as soon as the stream is loaded; waits up to ``wait_ms``)."""
        return self.call(
            VmInfo,
            "POST",
            f"/v1/vms/{name}/migration/finish",
            params={"migration": migration, "wait_ms": wait_ms},
        )

    def disk_mirror_abort(self, name: str) -> MirrorStatus:
        return self.call(MirrorStatus, "POST", f"/v1/vms/{name}/migration/mirror/abort")

    def migrate(self, name: str, req: OutgoingRequest) -> MigrationStats:
        return self.call(MigrationStats, "POST", f"/v1/vms/{name}/migration", json=dump(req))

    def migration(
        self,
        name: str,
        *,
        wait_ms: int = 0,
        known_status: str | None = None,
        migration: str | None = None,
    ) -> MigrationStats:
        """With ``migration``: that migration's figures, or status ``none`` if this VM's QEMU
        is not in it (an arrival's ``completed`` is not an outgoing one)."""
        params: dict[str, str | int] = {"wait_ms": wait_ms}
        if known_status is not None:
            params["known_status"] = known_status
        return self.call(
            MigrationStats, "GET", f"/v1/vms/{name}/migration", params=params | _of(migration)
        )

    def tune_migration(self, name: str, tune: MigrationTune) -> MigrationStats:
        return self.call(MigrationStats, "PATCH", f"/v1/vms/{name}/migration", json=dump(tune))

    def dirty_rate(self, name: str, req: DirtyRateRequest) -> DirtyRateReport:
        return self.call(DirtyRateReport, "POST", f"/v1/vms/{name}/dirty-rate", json=dump(req))

    def tls_csr(self) -> TlsCsr:
        return self.call(TlsCsr, "POST", "/v1/tls/csr")

    def install_tls(self, req: TlsInstall) -> TlsStatus:
        return self.call(TlsStatus, "PUT", "/v1/tls", json=dump(req))

    def probe_path(self, req: PathProbeRequest) -> PathProbe:
        return self.call(PathProbe, "POST", "/v1/net/probe", json=dump(req))

    def recover_incoming(self, name: str, req: PostcopyRecovery) -> PostcopyRecovery:
        return self.call(
            PostcopyRecovery,
            "POST",
            f"/v1/vms/{name}/migration/recover-incoming",
            json=dump(req),
        )

    def reconnect_outgoing(self, name: str, req: PostcopyRecovery) -> MigrationStats:
        return self.call(MigrationStats, "POST", f"/v1/vms/{name}/migration/resume", json=dump(req))

    def cancel_migration(self, name: str, *, migration: str | None = None) -> MigrationStats:
        return self.call(
            MigrationStats, "POST", f"/v1/vms/{name}/migration/cancel", params=_of(migration)
        )

    def release(self, name: str, *, migration: str | None = None) -> None:
        self.request("POST", f"/v1/vms/{name}/release", params=_of(migration))

    def resume(
        self, name: str, *, after_failed_switchover: bool = False, migration: str | None = None
    ) -> str:
        resp = self.request(
            "POST",
            f"/v1/vms/{name}/resume",
            params={"after_failed_switchover": str(after_failed_switchover).lower()}
            | _of(migration),
        )
        return str(resp.json()["qemu_status"])

    def announce(self, name: str) -> None:
        self.request("POST", f"/v1/vms/{name}/announce")


def _of(migration: str | None) -> dict[str, str]:
    """The ``migration`` query parameter, sent only when there is an id."""
    return {"migration": migration} if migration is not None else {}
