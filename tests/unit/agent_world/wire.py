"""What the scripted agents answer with: host facts, JSON bodies and the agent's error body."""

from __future__ import annotations

import re
from typing import Any

import httpx

from qmotion.api.errors import ErrorBody, ErrorDetail
from qmotion.api.host import AccelInfo


def _host_of(url: str) -> str:
    return re.sub(r"^http://agent-([a-z0-9]+)\.test.*$", r"\1", url)


def _facts() -> dict[str, Any]:
    return {
        "name": "h",
        "cpu_model": "qemu64",
        "cpu_flags": [],
        "cpus": 8,
        "agent_version": "test",
        "memory_bytes": 64 << 30,
        "cpu_models": ["qemu64"],
        "machine_types": ["pc-i440fx-10.0"],
        "machine_aliases": {"pc": "pc-i440fx-10.0"},
        "bridges": ["vmbr0"],
        "datastores": [],
        "accel": AccelInfo(name="tcg", reason="test").model_dump(mode="json"),
        "qemu_version": "10.0.2",
    }


def _json(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def _error(status: int, code: str, message: str, vm: str | None = None) -> httpx.Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, vm=vm))
    return httpx.Response(status, json=body.model_dump())
