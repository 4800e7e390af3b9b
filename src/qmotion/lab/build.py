"""Building a lab from its record: the switch, the client and host namespaces, their links
and datastores, then its processes. Each part is recorded before it is made.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from pathlib import Path

from qmotion.api.sizes import parse_rate_bytes
from qmotion.lab import netns
from qmotion.lab.errors import LabInputError, LabSetupError
from qmotion.lab.processes import (
    AGENT_PORT,
    enrol_hosts,
    start_agent,
    start_manager,
    start_wire,
    wait_agent,
)
from qmotion.lab.record import NAME_RE, LabDatastore, LabHost, LabRecord, save
from qmotion.paths import labs_dir

MAX_HOSTS = 50


def choose_subnet() -> int:
    used: set[int] = set()
    root = labs_dir()
    if root.is_dir():
        for rec_file in root.glob("*/lab.json"):
            with contextlib.suppress(ValueError, OSError):
                rec = LabRecord.model_validate_json(rec_file.read_text())
                used.add(int(rec.subnet.split(".")[2]))
    for addr in netns.root_addresses():
        parts = addr.split(".")
        if parts[:2] in (["198", "18"], ["198", "19"]):
            used.add(int(parts[2]))
    for k in range(1, 255):
        if k not in used:
            return k
    raise LabSetupError("no free /24 left in 198.18.0.0/16 for a new lab")


def validate(name: str, hosts: int, rtt_ms: float, bandwidth: str | None) -> None:
    if not NAME_RE.match(name):
        raise LabInputError(
            f"lab name {name!r}: 1-8 characters, lowercase letters and digits, starting with a "
            "letter (it prefixes every namespace and link the lab makes)"
        )
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabInputError(f"--hosts must be between 1 and {MAX_HOSTS}, got {hosts}")
    if not 0 <= rtt_ms <= 2000:
        raise LabInputError(f"--rtt-ms must be between 0 and 2000, got {rtt_ms}")
    if bandwidth is not None:
        try:
            parse_rate_bytes(bandwidth)
        except ValueError as exc:
            raise LabInputError(f"--bandwidth: {exc}") from exc


def build(rec: LabRecord, hosts: int, accel: str, small_datastore_mib: int | None) -> None:
    lab_dir = Path(rec.dir)
    save(rec)
    rec.links.append(rec.switch)
    save(rec)
    netns.create_bridge(None, rec.switch)
    netns.disable_ipv6(None, rec.switch)
    netns.add_address(None, rec.switch, rec.switch_address, 24)

    rec.namespaces.append(rec.client_namespace)
    rec.links.append(f"{rec.name}-c")
    save(rec)
    netns.create_ns(rec.client_namespace)
    netns.veth(f"{rec.name}-c", None, "eth0", rec.client_namespace)
    netns.enslave(None, f"{rec.name}-c", rec.switch)
    netns.add_address(rec.client_namespace, "eth0", rec.client_address, 24)

    wan = f"{rec.name}-wan" if rec.rtt_ms > 0 else None
    if wan is not None:
        rec.namespaces.append(wan)
        save(rec)
        netns.create_ns(wan)

    shared = lab_dir / "datastores" / "shared"
    shared.mkdir(parents=True)
    rec.datastores.append(
        LabDatastore(
            name="shared",
            path=str(shared),
            shared=True,
            hosts=[f"h{i}" for i in range(1, hosts + 1)],
        )
    )
    if small_datastore_mib is not None:
        small = lab_dir / "datastores" / "small"
        small.mkdir(parents=True)
        rec.datastores.append(
            LabDatastore(
                name="small",
                path=str(small),
                shared=True,
                hosts=[f"h{i}" for i in range(1, hosts + 1)],
                size_mib=small_datastore_mib,
            )
        )
        save(rec)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={small_datastore_mib}m", "tmpfs", str(small)],
            check=True,
            capture_output=True,
        )
    net = rec.switch_address.rsplit(".", 1)[0]
    mig_switch = f"{rec.name}-msw" if rec.migration_subnet else None
    if mig_switch is not None:
        rec.links.append(mig_switch)
        save(rec)
        netns.create_bridge(None, mig_switch)
        netns.disable_ipv6(None, mig_switch)
    pairs: list[str] = []
    for i in range(1, hosts + 1):
        hname = f"h{i}"
        ns = f"{rec.name}-{hname}"
        hdir = lab_dir / "hosts" / hname
        hdir.mkdir(parents=True)
        token_file = hdir / "token"
        if rec.insecure:  # a secure lab's hosts join: the manager calls them by certificate
            token_file.write_text(secrets.token_urlsafe(24) + "\n")
            token_file.chmod(0o600)
        local = lab_dir / "datastores" / f"local-{hname}"
        local.mkdir(parents=True)
        rec.datastores.append(
            LabDatastore(name=f"local-{hname}", path=str(local), shared=False, hosts=[hname])
        )
        address = f"{net}.{10 + i}"
        host = LabHost(
            name=hname,
            namespace=ns,
            address=address,
            agent_url=f"http://{address}:{AGENT_PORT}",
            token_file=str(token_file),
            state_dir=str(hdir / "agent"),
            run_dir=f"/run/qmotion/{rec.name}-{hname}",
            local_datastore=f"local-{hname}",
        )
        rec.hosts.append(host)
        rec.namespaces.append(ns)
        rec.links.append(ns)
        save(rec)
        netns.create_ns(ns)
        if wan is None:
            netns.veth(ns, None, "eth0", ns)
        else:
            # Host uplink -> the wan namespace's delay line -> switch port.
            netns.veth(ns, None, f"{hname}b", wan)
            netns.veth(f"{hname}a", wan, "eth0", ns)
            pairs.append(f"{hname}a:{hname}b")
        netns.enslave(None, ns, rec.switch)
        netns.create_bridge(ns, "vmbr0")
        netns.enslave(ns, "eth0", "vmbr0")
        netns.add_address(ns, "vmbr0", address, 24)
        if rec.bandwidth:
            netns.limit_rate(ns, "eth0", parse_rate_bytes(rec.bandwidth))
        if mig_switch is not None and rec.migration_subnet is not None:
            mnet = rec.migration_subnet.rsplit(".", 1)[0]
            host.migration_address = f"{mnet}.{10 + i}"
            rec.links.append(f"{ns}m")
            save(rec)
            if wan is None:
                netns.veth(f"{ns}m", None, "eth1", ns)
            else:
                netns.veth(f"{ns}m", None, f"{hname}mb", wan)
                netns.veth(f"{hname}ma", wan, "eth1", ns)
                pairs.append(f"{hname}ma:{hname}mb")
            netns.enslave(None, f"{ns}m", mig_switch)
            netns.add_address(ns, "eth1", host.migration_address, 24)
            if rec.bandwidth:
                netns.limit_rate(ns, "eth1", parse_rate_bytes(rec.bandwidth))
    if wan is not None:
        rec.wire_pid = start_wire(rec, wan, pairs)
        save(rec)
    if rec.insecure:
        for host in rec.hosts:
            host.agent_pid = start_agent(rec, host, accel)
            save(rec)
        for host in rec.hosts:
            wait_agent(host, rec)
        start_manager(rec)
    else:
        start_manager(rec)
        enrol_hosts(rec, accel)
    rec.ready = True
    save(rec)
