"""``qmotion agent``: run the host agent, and ``qmotion agent join``: enrol this host."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import typer

from qmotion.cli import config as config_file
from qmotion.cli.common import (
    ACCESS_LOG_OPTION,
    LOG_FORMAT_OPTION,
    console,
    errors_exit,
    fail,
    listen_address,
    log_format_of,
    service_token,
)

DEFAULT_CONFIG = config_file.ETC / "agent.toml"
DEFAULT_STATE = Path("/var/lib/qmotion/agent")
# Root's, and searchable by others (QEMU's user passes through to its VMs' directories, each
# closed to all but its group): what systemd's StateDirectoryMode= in the unit keeps too, so
# that systemd never re-owns the tree.
STATE_MODE = 0o711
app = typer.Typer(
    help="Run this host's agent (no subcommand), or enrol this host (`join`).",
    invoke_without_command=True,
)


@app.callback()
def agent(
    ctx: typer.Context,
    config: Path = config_file.option(DEFAULT_CONFIG, "the agent"),
    name: str = typer.Option(None, "--name", help="This host's name in the cluster."),
    listen: str = typer.Option("127.0.0.1:8100", "--listen", help="ADDRESS:PORT to serve on."),
    token_file: Path = typer.Option(
        None, "--token-file", help="File holding the bearer token (or set QMOTION_AGENT_TOKEN)."
    ),
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir"),
    run_dir: Path = typer.Option(None, "--run-dir", help="Short path for QMP sockets."),
    datastore: list[str] = typer.Option([], "--datastore", help="NAME=PATH[:shared], repeatable."),
    migration_address: list[str] = typer.Option(
        [],
        "--migration-address",
        help="Receive migrations on this address (repeatable, preferred first); the --listen "
        "address is the last fallback.",
    ),
    accel: str = typer.Option("auto", "--accel", help="auto (probe KVM, else TCG), kvm or tcg."),
    cpus: int = typer.Option(
        None, "--cpus", min=1, help="CPUs this host offers VMs (default: all the machine's)."
    ),
    memory: str = typer.Option(
        None, "--memory", help="Memory this host offers VMs, e.g. 6G (default: all of it)."
    ),
    hugepages: bool = typer.Option(
        True,
        "--hugepages/--no-hugepages",
        help="Back guest RAM from the host's 2 MiB huge-page pool when it has room.",
    ),
    qemu_user: str = typer.Option(
        "qmotion-qemu",
        "--qemu-user",
        help="The unprivileged user QEMU runs as (its disks become that user's); `root` runs "
        "QEMU as the agent's own user, confined by seccomp only.",
    ),
    cgroups: bool = typer.Option(
        True,
        "--cgroups/--no-cgroups",
        help="Each QEMU in a cgroup of its own: CPU weight by vCPUs, memory limit (RAM plus "
        "QEMU's overhead), task limit; v2 or v1, where the host lets the agent write one.",
    ),
    log_format: str = LOG_FORMAT_OPTION,
    access_log: bool = ACCESS_LOG_OPTION,
) -> None:
    """Serve this host's VMs: over mutual TLS once it joined (only the manager's certificate
    gets in), else over HTTP with a bearer token on every call."""
    from qmotion.agent.config import AgentConfig, parse_datastore
    from qmotion.agent.main import run
    from qmotion.agent.tls import TlsStore

    if ctx.invoked_subcommand is not None:
        return
    if not name:
        fail("--name (or name in the config file) is required", 2)
    fmt = log_format_of(log_format)
    from qmotion.hypervisor.errors import HypervisorError
    from qmotion.hypervisor.user import lookup

    try:
        if lookup(qemu_user) is None:
            console.print(
                "[bold red]--qemu-user root: QEMU runs as root[/] (seccomp only); "
                "a guest escaping into QEMU owns this host"
            )
    except HypervisorError as exc:
        fail(f"--qemu-user: {exc}", 2)
    joined = TlsStore(state_dir, name).control_tls
    token: str | None = None
    if token_file is not None or not joined:
        token = service_token(token_file, "QMOTION_AGENT_TOKEN")
    if accel not in ("auto", "kvm", "tcg"):
        fail(f"--accel must be auto, kvm or tcg, got {accel!r}", 2)
    host, port = listen_address(listen)
    try:
        if ipaddress.IPv4Address(host).is_unspecified:
            raise ValueError
    except ValueError:
        # The listen address is also where migrations arrive last and what other hosts'
        # certificates name: it must be this host's own IPv4 address.
        fail(f"--listen: {host!r} must be one IPv4 address of this host (not a name or 0.0.0.0)", 2)
    try:
        stores = tuple(parse_datastore(d) for d in datastore)
    except ValueError as exc:
        fail(f"--datastore: {exc}", 2)
    for a in migration_address:
        try:
            ipaddress.IPv4Address(a)
        except ValueError:
            fail(f"--migration-address: {a!r} is not an IPv4 address", 2)
    memory_bytes = None
    if memory is not None:
        from qmotion.api.sizes import parse_size

        try:
            memory_bytes = parse_size(memory)
        except ValueError as exc:
            fail(f"--memory: {exc}", 2)
    agent_config = AgentConfig(
        cpus=cpus,
        memory_bytes=memory_bytes,
        name=name,
        state_dir=state_dir,
        token=token,
        address=host,
        port=port,
        migration_addresses=tuple(dict.fromkeys(migration_address)),
        run_dir=run_dir or Path(f"/run/qmotion/agent-{name}"),
        accel=accel,
        hugepages=hugepages,
        datastores=stores,
        qemu_user=qemu_user,
        cgroups=cgroups,
    )
    # Everything the service writes (database, keys, VM state) is its own only.
    os.umask(0o077)
    state_dir.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
    state_dir.chmod(STATE_MODE)  # made by an older version, or by hand
    run(agent_config, host, port, fmt, access_log)


@app.command("join")
def join(
    manager: str = typer.Argument(..., help="The manager's URL, https://ADDRESS:PORT"),
    name: str = typer.Option(..., "--name", help="This host's name, as `host add` gave it."),
    token: str = typer.Option(..., "--token", help="The one-time join token from `host add`."),
    ca_hash: str = typer.Option(
        ..., "--ca-hash", help="sha256:... of the cluster CA, from `host add`: it is pinned."
    ),
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="The config file to write."),
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir"),
) -> None:
    """Enrol this host: make its key here (it never leaves), have the cluster CA sign it,
    and write the agent's config and token; then start the agent."""
    from qmotion.agent.errors import AgentError
    from qmotion.agent.tls import TlsStore
    from qmotion.api.enrol import JoinRequest
    from qmotion.client.enrol import join as join_call
    from qmotion.client.enrol import pinned_ca

    if not manager.startswith("https://"):
        fail(f"MANAGER must be an https:// URL, got {manager!r}", 2)
    manager = manager.rstrip("/")
    os.umask(0o077)
    state_dir.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
    state_dir.chmod(STATE_MODE)
    store = TlsStore(state_dir, name)
    with errors_exit():
        ca_pem = pinned_ca(manager, ca_hash)
        answer = join_call(manager, ca_pem, JoinRequest(token=token, csr_pem=store.csr()))
        try:
            store.install(answer.ca_pem, answer.cert_pem)
        except AgentError as exc:
            fail(f"the manager's answer does not fit this host's key: {exc}")
        if answer.manager_ca_pem is not None:
            store.install_manager_ca(answer.manager_ca_pem)
    values: dict[str, str | int | float | bool | list[str]] = {}
    if config.exists():
        import tomllib

        values.update(tomllib.loads(config.read_text()))
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(name=answer.name, listen=f"{answer.address}:{answer.port}")
    values.update(state_dir=str(state_dir))
    values.pop("token_file", None)
    if answer.agent_token is not None:
        # A manager without a client certificate: the agent takes a bearer token.
        token_file = state_dir / "agent.token"
        token_file.write_text(answer.agent_token + "\n")
        token_file.chmod(0o600)
        values["token_file"] = str(token_file)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        config_file.dump(
            values,
            f"qmotion agent: joined {manager} as {answer.name}.\n"
            "Every flag of `qmotion agent` has a key here; flags override.",
        )
    )
    config.chmod(0o644)
    console.print(
        f"joined as {answer.name} ({answer.address}:{answer.port}); wrote {config}.\n"
        "Start the agent: systemctl enable --now qmotion-agent "
        f"(or: qmotion agent --config {config})"
    )
