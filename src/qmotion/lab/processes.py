"""The lab's processes: the manager in the root namespace, an agent in each host's namespace,
the delay line in the wan namespace; started, waited for, and stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import httpx

from qmotion.api.enrol import JoinTokenCreate
from qmotion.api.server import HostRegister, PoolSet
from qmotion.client.agent import AgentClient
from qmotion.client.errors import ClientError
from qmotion.client.server import ServerClient
from qmotion.image.cc import compile_static
from qmotion.lab import netns
from qmotion.lab.errors import LabSetupError
from qmotion.lab.record import LabHost, LabRecord, LabReplica, save

AGENT_PORT = 8100
MANAGER_PORT = 8000
FIRST_REPLICA = "m1"  # the lab's own manager, among its replicas
AGENT_READY_TIMEOUT_S = 60.0


def start_manager(rec: LabRecord, register: bool = True) -> None:
    """The lab's manager runs in the root namespace, on the switch address; HTTPS under the
    cluster CA unless the lab is insecure. ``register``: a new manager (new token), which
    then learns the address pool and, in an insecure lab, the hosts (a secure lab's hosts
    join: ``enrol_hosts``)."""
    lab_dir = Path(rec.dir)
    token_file = lab_dir / "manager.token"
    if register:
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
    rec.manager_url = _manager_url(rec, MANAGER_PORT)
    rec.manager_token_file = str(token_file)
    rec.manager_ca_file = None if rec.insecure else str(lab_dir / "ca" / "ca-cert.pem")
    rec.manager_pid = _spawn_manager(rec, FIRST_REPLICA, MANAGER_PORT)
    save(rec)
    token = token_file.read_text().strip()
    _wait_manager(rec, rec.manager_url, rec.manager_pid, FIRST_REPLICA, token)
    if not register:
        return
    with _manager_client(rec, token) as client:
        if rec.insecure:
            for h in rec.hosts:
                client.register_host(
                    HostRegister(
                        name=h.name,
                        agent_url=h.agent_url,
                        token=Path(h.token_file).read_text().strip(),
                    )
                )
        client.set_pool(
            PoolSet(first=rec.pool.first, last=rec.pool.last, prefixlen=rec.pool.prefixlen)
        )


def start_replica(rec: LabRecord, name: str) -> LabReplica:
    """Another manager on the lab's database, on the next port: a replica of the first
    (the same token, CA and hosts)."""
    if rec.manager_url is None or rec.manager_token_file is None:
        raise LabSetupError(f"lab {rec.name} has no manager to add a replica to")
    taken = {r.name for r in rec.replicas} | {FIRST_REPLICA}
    if name in taken:
        raise LabSetupError(f"lab {rec.name} has a manager named {name} already")
    port = MANAGER_PORT + len(rec.replicas) + 1
    replica = LabReplica(name=name, url=_manager_url(rec, port))
    replica.pid = _spawn_manager(rec, name, port)
    rec.replicas.append(replica)
    save(rec)
    token = Path(rec.manager_token_file).read_text().strip()
    _wait_manager(rec, replica.url, replica.pid, name, token)
    return replica


def _manager_url(rec: LabRecord, port: int) -> str:
    return f"{'http' if rec.insecure else 'https'}://{rec.switch_address}:{port}"


def _spawn_manager(rec: LabRecord, name: str, port: int) -> int:
    lab_dir = Path(rec.dir)
    argv = [
        sys.executable,
        "-m",
        "qmotion",
        "server",
        "--listen",
        f"{rec.switch_address}:{port}",
        "--db",
        rec.db_url or f"sqlite:///{lab_dir / 'manager.db'}",
        "--replica",
        name,
        "--lease",
        str(rec.lease_s),
        "--token-file",
        str(lab_dir / "manager.token"),
        *(["--insecure"] if rec.insecure else ["--ca-dir", str(lab_dir / "ca")]),
    ]
    log = lab_dir / ("manager.log" if name == FIRST_REPLICA else f"manager-{name}.log")
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
        )
    return proc.pid


def _wait_manager(rec: LabRecord, url: str, pid: int | None, name: str, token: str) -> None:
    lab_dir = Path(rec.dir)
    log = lab_dir / ("manager.log" if name == FIRST_REPLICA else f"manager-{name}.log")
    deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
    while True:
        try:
            # The CA file appears once the manager made it (first start).
            with ServerClient(url, token, timeout_s=60, ca_file=rec.manager_ca_file) as client:
                client.hosts()
            return
        except (ClientError, OSError) as exc:
            if time.monotonic() > deadline or not _alive(pid):
                tail = log.read_text(errors="replace")[-1500:]
                raise LabSetupError(f"manager {name} did not start: {exc}\n{tail}") from exc
            time.sleep(0.2)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reaped if it exited
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()
    return done == 0


def _manager_client(rec: LabRecord, token: str) -> ServerClient:
    assert rec.manager_url is not None
    return ServerClient(rec.manager_url, token, timeout_s=60, ca_file=rec.manager_ca_file)


def enrol_hosts(rec: LabRecord, accel: str) -> None:
    """A secure lab's hosts enter the cluster as real ones do: ``host add`` on the manager
    (a one-time join token), ``qmotion agent join`` in the host's namespace (its key made
    there, its certificate signed by the cluster CA, its config written), the agent started
    from that config; returns once the manager sees every host up."""
    assert rec.manager_url is not None and rec.manager_token_file is not None
    token = Path(rec.manager_token_file).read_text().strip()
    with _manager_client(rec, token) as client:
        for h in rec.hosts:
            jt = client.create_join_token(
                JoinTokenCreate.model_validate(
                    {
                        "name": h.name,
                        "address": h.address,
                        "port": AGENT_PORT,
                        "migration_addresses": [h.migration_address] if h.migration_address else [],
                    }
                )
            )
            config = Path(h.state_dir).parent / "agent.toml"
            argv = [
                "ip", "netns", "exec", h.namespace, sys.executable, "-m", "qmotion",
                "agent", "join", rec.manager_url, "--name", h.name, "--token", jt.token,
                "--ca-hash", jt.ca_hash, "--config", str(config), "--state-dir", h.state_dir,
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise LabSetupError(f"{h.name}: agent join failed: {done.stderr.strip()}")
            h.config_file = str(config)
            h.agent_url = f"https://{h.address}:{AGENT_PORT}"
            h.token_file = ""  # the manager calls it by its client certificate
            save(rec)
        for h in rec.hosts:
            h.agent_pid = start_agent(rec, h, accel)
            save(rec)
        for h in rec.hosts:
            wait_agent(h, rec)
        deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
        while True:
            down = [h.name for h in client.refresh_hosts() if h.state != "up"]
            if not down:
                return
            if time.monotonic() > deadline:
                raise LabSetupError(f"hosts joined but the manager does not see them up: {down}")
            time.sleep(0.5)


def start_wire(rec: LabRecord, wan: str, pairs: list[str]) -> int:
    """The delay line: half the RTT on each host's egress (this kernel may lack sch_netem)."""
    source = resources.files("qmotion.lab").joinpath("qmwire.c").read_bytes()
    binary = compile_static("qmwire", source)
    delay_us = int(rec.rtt_ms * 1000 / 2)
    log = open(Path(rec.dir) / "wire.log", "ab")  # noqa: SIM115
    with log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", wan, str(binary), str(delay_us), *pairs],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    time.sleep(0.2)
    if proc.poll() is not None:
        raise LabSetupError(f"delay line exited: {(Path(rec.dir) / 'wire.log').read_text()[-500:]}")
    return proc.pid


def start_agent(rec: LabRecord, host: LabHost, accel: str) -> int:
    argv = [
        *netns.enter(host.namespace),
        sys.executable,
        "-m",
        "qmotion",
        "agent",
        "--name",
        host.name,
        "--listen",
        f"{host.address}:{AGENT_PORT}",
        # A joined host: its config, and mutual TLS instead of a token.
        *(["--config", host.config_file] if host.config_file else []),
        *([] if host.config_file else ["--token-file", host.token_file]),
        "--state-dir",
        host.state_dir,
        "--run-dir",
        host.run_dir,
        "--accel",
        accel,
        "--hugepages"
        if (rec.hugepages if host.hugepages is None else host.hugepages)
        else "--no-hugepages",
    ]
    if host.migration_address:
        argv += ["--migration-address", host.migration_address]
    if rec.host_cpus:
        argv += ["--cpus", str(rec.host_cpus)]
    if rec.host_memory_mib:
        argv += ["--memory", f"{rec.host_memory_mib}M"]
    for ds in rec.datastores:
        if host.name in ds.hosts:
            argv += ["--datastore", f"{ds.name}={ds.path}" + (":shared" if ds.shared else "")]
    logf = open(Path(host.state_dir).parent / "agent.log", "ab")  # noqa: SIM115
    with logf:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
    return proc.pid


def agent_client(rec: LabRecord, host: LabHost, timeout_s: float = 120.0) -> AgentClient:
    """The lab (its operator) calls an agent directly: a joined host's by the manager's
    client certificate (mutual TLS), an insecure lab's by its token."""
    if host.agent_url.startswith("https:"):
        ca = Path(rec.dir) / "ca"
        return AgentClient(
            host.agent_url,
            "",
            timeout_s=timeout_s,
            ca_file=str(ca / "ca-cert.pem"),
            cert=(str(ca / "manager-client-cert.pem"), str(ca / "manager-client-key.pem")),
        )
    return AgentClient(
        host.agent_url, Path(host.token_file).read_text().strip(), timeout_s=timeout_s
    )


def wait_agent(host: LabHost, rec: LabRecord) -> None:
    deadline = time.monotonic() + AGENT_READY_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with agent_client(rec, host, timeout_s=30) as client:
                client.host()
            return
        except (ClientError, httpx.HTTPError) as exc:
            last = exc
            time.sleep(0.2)
    log_file = Path(host.state_dir).parent / "agent.log"
    tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
    raise LabSetupError(f"agent on {host.name} did not become ready: {last}\n{tail}")


def stop_pid(pid: int | None, what: bytes, crash: bool = False) -> None:
    """End a lab process outside its namespaces, only if the PID is still that process
    (``crash``: SIGKILL at once, as a process dying)."""
    if pid is None:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if what not in cmdline:
        return
    for sig in (signal.SIGKILL,) if crash else (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        for _ in range(50):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
