"""The cloud-init NoCloud seed of a user's own guest: an ISO labelled ``cidata``.

It holds ``meta-data``, ``user-data`` and ``network-config``, as Proxmox's cloud-init drive.

The seed is made from the VM's definition alone, on whichever host starts the VM (the source
at first boot, the destination of a migration: both attach the same CD-ROM, so the device
sets match). The address goes in a network-config v2 that matches the NIC by its MAC, so an
unmodified cloud image configures the right interface whatever the kernel names it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pycdlib
import yaml

from qmotion.api.vm import VmSpec

VOLUME = "cidata"  # what cloud-init's NoCloud datasource looks for


def documents(spec: VmSpec) -> dict[str, str]:
    """The seed's three files (JSON is YAML: no YAML writer needed, nothing mis-quoted)."""
    ci = spec.cloud_init
    assert ci is not None
    meta = {"instance-id": str(spec.uuid), "local-hostname": ci.hostname}
    # The operator's keys, then the VM's identity over them: its name is not theirs to change.
    config: dict[str, object] = {}
    if ci.user_data:
        loaded = yaml.safe_load(ci.user_data)
        if isinstance(loaded, dict):
            config.update(loaded)
    config |= {"hostname": ci.hostname, "preserve_hostname": False, "manage_etc_hosts": True}
    user = "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)
    ethernets = {}
    for i, nic in enumerate(spec.nics):
        eth: dict[str, object] = {"match": {"macaddress": nic.mac}, "set-name": f"eth{i}"}
        if i == 0 and ci.address is not None:
            eth["addresses"] = [str(ci.address)]
        else:
            eth["dhcp4"] = False
        ethernets[f"nic{i}"] = eth
    network = {"version": 2, "ethernets": ethernets}
    return {
        "meta-data": json.dumps(meta, indent=2) + "\n",
        "user-data": user,
        "network-config": json.dumps(network, indent=2) + "\n",
    }


def write_seed(spec: VmSpec, path: Path) -> None:
    """Write the seed ISO to ``path`` (replacing it whole)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME)
    for name, text in documents(spec).items():
        data = text.encode()
        short = name.replace("-", "_").upper()[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), f"/{short}", rr_name=name, joliet_path=f"/{name}")
    partial = path.with_name(f".{path.name}.partial")
    iso.write(str(partial))
    iso.close()
    partial.replace(path)


def read_seed(path: Path) -> dict[str, str]:
    """The seed's files by name, as cloud-init would read them (for tests and checks)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    out = {}
    try:
        for name in ("meta-data", "user-data", "network-config"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, joliet_path=f"/{name}")
            out[name] = buf.getvalue().decode()
    finally:
        iso.close()
    return out
