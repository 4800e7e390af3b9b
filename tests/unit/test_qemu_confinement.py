"""QEMU is confined: seccomp on, disk paths are data (never options), boot files only from the
host's datastores or image cache (real QEMU, real agent app)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from qmotion.agent.app import create_app
from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.api.vm import VmSpec
from qmotion.hypervisor import process
from qmotion.hypervisor.qemu import LaunchPaths, build_argv, qemu_info, resolve_machine

TOKEN = "t" * 32


def _qmp(sock_path: Path, command: str) -> Any:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sock_path))
        f = sock.makefile("rw")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                pass  # events
        return reply["return"]


@pytest.fixture
def started_qemu(tmp_path: Path) -> Iterator[tuple[int, Path, Path, Path]]:
    """A paused QEMU whose disk path carries a comma and what QEMU's old option syntax would
    read as a second ``filename``."""
    store = tmp_path / "store"
    store.mkdir()
    decoy = tmp_path / "decoy.img"
    decoy.write_bytes(b"\0" * 65536)
    name = f"a,filename={decoy}"
    disk = store / name
    disk.parent.mkdir(parents=True, exist_ok=True)
    disk.write_bytes(b"\0" * 65536)
    spec = VmSpec.model_validate(
        {
            "name": "conf",
            "memory": "64M",
            "boot": {"kind": "disk"},
            "disks": [{"datastore": "s", "path": name, "format": "raw"}],
        }
    )
    paths = LaunchPaths(
        qmp_socket=tmp_path / "q.sock",
        console_log=tmp_path / "console.log",
        pidfile=tmp_path / "qemu.pid",
        disks=[disk],
    )
    machine = resolve_machine(spec.machine, qemu_info())
    argv = build_argv(spec, paths, accel="tcg", machine=machine, paused=True)
    pid = process.launch(argv, paths.pidfile, tmp_path / "qemu.log", "conf", paths.qmp_socket)
    try:
        yield pid, paths.qmp_socket, disk, decoy
    finally:
        process.kill(pid, spec.uuid)


def test_qemu_runs_under_seccomp_without_privilege_gain(
    started_qemu: tuple[int, Path, Path, Path],
) -> None:
    pid = started_qemu[0]
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Seccomp"].strip() == "2"  # filter mode
    assert status["NoNewPrivs"].strip() == "1"
    # Its own session: an agent restart (systemd KillMode=process) does not reach it.
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3] == str(pid)


def test_a_comma_in_a_disk_path_is_part_of_the_file_name(
    started_qemu: tuple[int, Path, Path, Path],
) -> None:
    _, qmp, disk, decoy = started_qemu
    files = {n["node-name"]: n["file"] for n in _qmp(qmp, "query-named-block-nodes")}
    assert files["file0"] == str(disk)
    assert str(decoy) not in files.values()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    store = tmp_path / "store"
    store.mkdir()
    config = AgentConfig(
        name="h9",
        state_dir=tmp_path / "state",
        token=TOKEN,
        run_dir=tmp_path / "run",
        accel="tcg",
        datastores=(DatastoreConfig("shared", store, True),),
    )
    config.state_dir.mkdir()
    with TestClient(create_app(config)) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client, store


def _kernel_vm(**boot: str) -> dict[str, Any]:
    return {"name": "k1", "memory": "256M", "boot": {"kind": "kernel", **boot}}


@pytest.mark.parametrize("field", ["kernel", "initrd"])
def test_a_boot_file_outside_the_datastores_is_refused(
    agent: tuple[TestClient, Path], field: str, tmp_path: Path
) -> None:
    client, store = agent
    outside = tmp_path / "secret.key"
    outside.write_text("private")
    (store / "vmlinuz").write_bytes(b"k")
    (store / "link").symlink_to(outside)
    boot = {"kernel": str(store / "vmlinuz")}
    for path in (str(outside), str(store / "link"), f"{store}/../secret.key", "vmlinuz"):
        resp = client.post("/v1/vms", json=_kernel_vm(**{**boot, field: path}))
        assert resp.status_code == 422, path
        err = resp.json()["error"]
        assert err["field"] == f"boot.{field}"
        assert "outside" in err["message"]
    assert client.get("/v1/vms").json() == []


def test_a_boot_file_inside_a_datastore_is_accepted(agent: tuple[TestClient, Path]) -> None:
    client, store = agent
    (store / "boot").mkdir()
    (store / "boot" / "vmlinuz").write_bytes(b"k")
    (store / "boot" / "initrd").write_bytes(b"i")
    resp = client.post(
        "/v1/vms",
        json=_kernel_vm(kernel=str(store / "boot/vmlinuz"), initrd=str(store / "boot/initrd")),
    )
    assert resp.status_code == 201, resp.text


QEMU_USER = "qmotion-qemu"


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory other users may pass through, as /var/lib is (pytest's tmp is closed)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="qmotion-confine-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _user_agent(base: Path) -> AgentConfig:
    store = base / "store"
    store.mkdir(exist_ok=True)
    return AgentConfig(
        name="h9",
        state_dir=base / "state",
        token=TOKEN,
        run_dir=base / "run",
        accel="tcg",
        hugepages=False,
        datastores=(DatastoreConfig("shared", store, True),),
        qemu_user=QEMU_USER,
    )


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def test_qemu_runs_as_its_unprivileged_user_and_owns_only_its_vm(open_base: Path) -> None:
    import pwd

    user = pwd.getpwnam(QEMU_USER)
    config = _user_agent(open_base)
    config.state_dir.mkdir(mode=0o700)
    old_umask = os.umask(0o077)  # as `qmotion agent` runs
    try:
        _run_as_user(config, open_base, user)
    finally:
        os.umask(old_umask)


def _run_as_user(config: AgentConfig, open_base: Path, user: Any) -> None:
    import stat

    vm = {
        "name": "u1",
        "memory": "128M",
        "boot": {"kind": "kernel"},
        "disks": [{"datastore": "shared", "path": "u1/disk.qcow2", "create_size": 67108864}],
    }
    with TestClient(create_app(config)) as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        assert client.post("/v1/vms", json=vm).status_code == 201
        resp = client.post("/v1/vms/u1/start")
        assert resp.status_code == 200, resp.text
        vm_dir = config.state_dir / "vms" / "u1"
        pid = json.loads((vm_dir / "runtime.json").read_text())["pid"]
        try:
            status = _status(pid)
            # real, effective, saved and file-system IDs: no way back to root
            assert status["Uid"].split() == [str(user.pw_uid)] * 4
            assert status["Gid"].split() == [str(user.pw_gid)] * 4
            assert "0" not in status["Groups"].split()
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
            disk = open_base / "store" / "u1" / "disk.qcow2"
            assert disk.stat().st_uid == user.pw_uid
            assert stat.S_IMODE(disk.stat().st_mode) & 0o077 == 0
            # The agent's records stay root's own; the way to them is not listable.
            spec = vm_dir / "spec.json"
            assert spec.stat().st_uid == 0 and stat.S_IMODE(spec.stat().st_mode) == 0o600
            for d in (config.state_dir, config.state_dir / "vms", vm_dir):
                assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0o010, d
            # It runs (its console log is its own to write).
            assert client.get("/v1/vms/u1").json()["state"] == "running"

            # Suspend and resume: QEMU writes, then reads, its saved state file.
            resp = client.post("/v1/vms/u1/suspend")
            assert resp.status_code == 200, resp.text
            saved = next((open_base / "store" / "u1").glob("saved-*.state"))
            assert saved.stat().st_uid == user.pw_uid and saved.stat().st_size > 1 << 16
            resp = client.post("/v1/vms/u1/start")
            assert resp.status_code == 200, resp.text
            assert client.get("/v1/vms/u1").json()["state"] == "running"
            pid = json.loads((vm_dir / "runtime.json").read_text())["pid"]
            assert _status(pid)["Uid"].split()[0] == str(user.pw_uid)
        finally:
            client.post("/v1/vms/u1/stop", json={"force": True})


def test_an_agent_whose_directories_are_closed_to_qemus_user_says_which(tmp_path: Path) -> None:
    """Under pytest's tmp (0700, above the agent's own directories, so never opened by it):
    the agent does not start, and names the directory to open."""
    from qmotion.agent.errors import OperationFailed

    config = _user_agent(tmp_path)
    config.state_dir.mkdir()
    closed = [p for p in tmp_path.parents if p.stat().st_mode & 0o001 == 0][-1]  # topmost
    with (
        pytest.raises(OperationFailed, match="closed to it") as info,
        TestClient(create_app(config)),
    ):
        pass
    assert f"directory {closed} " in str(info.value)
    assert info.value.field == "qemu_user"


def test_a_qemu_that_cannot_enter_its_cgroup_does_not_run(tmp_path: Path) -> None:
    import subprocess

    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 65536)
    spec = VmSpec.model_validate(
        {
            "name": "nocg",
            "memory": "64M",
            "boot": {"kind": "disk"},
            "disks": [{"datastore": "s", "path": "d.raw", "format": "raw"}],
        }
    )
    paths = LaunchPaths(
        qmp_socket=tmp_path / "q.sock",
        console_log=tmp_path / "console.log",
        pidfile=tmp_path / "qemu.pid",
        disks=[disk],
    )
    machine = resolve_machine(spec.machine, qemu_info())
    argv = build_argv(spec, paths, accel="tcg", machine=machine, paused=True)
    seen: list[int] = []

    def refuse(pid: int) -> None:
        seen.append(pid)
        raise OSError("no room in this cgroup")

    with pytest.raises(OSError, match="no room"):
        process.launch(
            argv, paths.pidfile, tmp_path / "q.log", "nocg", paths.qmp_socket, placed=refuse
        )
    assert seen and not process.is_qemu_of(seen[0], spec.uuid)
    left = subprocess.run(["pgrep", "-f", str(spec.uuid)], capture_output=True, check=False)
    assert left.stdout == b""
