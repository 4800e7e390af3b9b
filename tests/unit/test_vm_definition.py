"""What a VM definition needs of the host (qmotion.agent.vms.definition): refusals name the
field, and nothing is made by a check."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.agent.errors import SpecRejected
from qmotion.agent.vms import definition
from qmotion.api.vm import Disk, DiskBoot, Nic, VmSpec
from qmotion.hypervisor.qemu import QemuInfo


def _config(root: Path) -> AgentConfig:
    (root / "ds").mkdir()
    return AgentConfig(
        name="h1",
        state_dir=root / "state",
        token="t",
        datastores=(DatastoreConfig("ds", root / "ds", shared=False),),
    )


@pytest.fixture(autouse=True)
def _host(monkeypatch: pytest.MonkeyPatch) -> None:
    info = QemuInfo("10.0.2", ["pc-i440fx-10.0"], {"pc": "pc-i440fx-10.0"}, ["qemu64"])
    monkeypatch.setattr(definition, "qemu_info", lambda binary="": info)
    monkeypatch.setattr(definition, "bridges", lambda: ["vmbr0"])


def _refused(config: AgentConfig, spec: VmSpec, *, creating: bool = False) -> str | None:
    with pytest.raises(SpecRejected) as exc:
        definition.check_spec(config, spec, creating=creating)
    return exc.value.field


def test_paths_are_on_the_named_datastore(tmp_path: Path) -> None:
    config = _config(tmp_path)
    spec = VmSpec(
        name="v",
        memory="64M",
        disks=[Disk(datastore="ds", path="v/d0.qcow2")],
        saved_state=Disk(datastore="ds", path="v/saved.state", format="raw"),
    )
    assert definition.disk_path(config, spec, 0) == tmp_path / "ds/v/d0.qcow2"
    assert definition.saved_path(config, spec) == tmp_path / "ds/v/saved.state"
    assert definition.saved_path(config, spec.model_copy(update={"saved_state": None})) is None
    elsewhere = VmSpec(name="v", memory="64M", disks=[Disk(datastore="far", path="d.qcow2")])
    with pytest.raises(SpecRejected) as exc:
        definition.disk_path(config, elsewhere, 0)
    assert exc.value.field == "disks[0].datastore"


def test_check_spec_names_the_field_it_refuses(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ok = VmSpec(name="v", memory="64M", nics=[Nic(mac="52:54:00:00:00:01")])
    definition.check_spec(config, ok)
    assert _refused(config, ok.model_copy(update={"machine": "q35"})) == "machine"
    assert _refused(config, ok.model_copy(update={"cpu_model": "host"})) == "cpu_model"
    no_bridge = ok.model_copy(update={"nics": [Nic(mac="52:54:00:00:00:01", bridge="br9")]})
    assert _refused(config, no_bridge) == "nics[0].bridge"
    saved = ok.model_copy(update={"saved_state": Disk(datastore="ds", path="gone", format="raw")})
    assert _refused(config, saved) == "saved_state.path"


def test_a_missing_disk_passes_only_when_it_is_to_be_made(tmp_path: Path) -> None:
    config = _config(tmp_path)
    disk = Disk(datastore="ds", path="v/d0.qcow2", create_size=1 << 20, bootable=True)
    spec = VmSpec(name="v", memory="64M", boot=DiskBoot(), disks=[disk])
    assert _refused(config, spec) == "disks[0].path"
    definition.check_spec(config, spec, creating=True)
    assert not (tmp_path / "ds/v").exists()  # a check makes nothing
