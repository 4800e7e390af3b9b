"""Typed client of a host agent's API."""

from __future__ import annotations

from qmotion.api.host import HostFacts, HostMetrics
from qmotion.api.vm import StopRequest, VmInfo, VmSpec
from qmotion.client.base import BaseClient, dump


class AgentClient(BaseClient):
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

    def stop(self, name: str, *, force: bool = False, timeout_s: float = 30.0) -> VmInfo:
        req = StopRequest(force=force, timeout_s=timeout_s)
        return self.call(VmInfo, "POST", f"/v1/vms/{name}/stop", json=dump(req))

    def delete(self, name: str, *, force: bool = False) -> None:
        self.request("DELETE", f"/v1/vms/{name}", params={"force": str(force).lower()})

    def console(self, name: str, tail_bytes: int = 65536) -> str:
        return self.request(
            "GET", f"/v1/vms/{name}/console", params={"tail_bytes": tail_bytes}
        ).text
