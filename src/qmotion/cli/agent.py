"""``qmotion agent``: run the host agent."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from qmotion.cli.common import (
    ACCESS_LOG_OPTION,
    LOG_FORMAT_OPTION,
    fail,
    listen_address,
    log_format_of,
    service_token,
)


def agent(
    name: str = typer.Option(..., "--name", help="This host's name in the cluster."),
    listen: str = typer.Option("127.0.0.1:8100", "--listen", help="ADDRESS:PORT to serve on."),
    token_file: Path = typer.Option(
        None, "--token-file", help="File holding the bearer token (or set QMOTION_AGENT_TOKEN)."
    ),
    state_dir: Path = typer.Option(Path("/var/lib/qmotion/agent"), "--state-dir"),
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
    log_format: str = LOG_FORMAT_OPTION,
    access_log: bool = ACCESS_LOG_OPTION,
) -> None:
    """Serve this host's VMs over HTTP (bearer token required on every call)."""
    from qmotion.agent.config import AgentConfig, parse_datastore
    from qmotion.agent.main import run

    fmt = log_format_of(log_format)
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
    config = AgentConfig(
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
    )
    run(config, host, port, fmt, access_log)
