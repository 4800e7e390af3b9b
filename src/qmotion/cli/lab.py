"""``qmotion lab``: a local multi-host lab of network namespaces, each host with an agent."""

from __future__ import annotations

import os

import typer
from rich.markup import escape
from rich.text import Text

from qmotion.cli.common import console, errors_exit, fail, print_json

app = typer.Typer(help="A local lab: hosts as network namespaces on one switch.")

NameOpt = typer.Option("qmlab", "--name", help="Lab name; prefixes its namespaces and links.")


@app.command("up")
def up(
    hosts: int = typer.Option(3, "--hosts", help="Number of hosts."),
    rtt_ms: float = typer.Option(0.0, "--rtt-ms", help="Emulated round-trip time between hosts."),
    bandwidth: str = typer.Option(None, "--bandwidth", help="Host link rate, e.g. 1gbit."),
    accel: str = typer.Option("auto", "--accel", help="auto (probe KVM), kvm or tcg."),
    name: str = NameOpt,
    hugepages: str = typer.Option(
        None,
        "--hugepages",
        help="Huge-page pool for guest RAM, e.g. 3G (default: 3G, at most 1/4 of memory); "
        "0 runs guests from ordinary memory.",
    ),
    migration_net: bool = typer.Option(
        False, "--migration-net", help="A second switch for migration traffic (198.19.K.0/24)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext migration streams: the manager has no cluster CA."
    ),
    host_cpus: int = typer.Option(
        None, "--host-cpus", min=1, help="CPUs each host offers VMs (default: cores / hosts)."
    ),
    host_memory: str = typer.Option(
        None,
        "--host-memory",
        help="Memory each host offers VMs, e.g. 6G (default: 3/4 of memory / hosts).",
    ),
    postgres_db: bool = typer.Option(
        False,
        "--postgres",
        help="The manager's database is a PostgreSQL the lab starts (Debian's postgresql; "
        "a Unix socket in the lab's directory) instead of a SQLite file.",
    ),
    managers: int = typer.Option(
        1, "--managers", min=1, max=4, help="Manager replicas on the database (needs --postgres)."
    ),
    lease_s: float = typer.Option(
        10.0, "--lease", min=1.0, max=300.0, help="The manager replicas' lease, seconds."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the lab as JSON."),
) -> None:
    """Create the lab: switch, client namespace, hosts with agents, datastores."""
    from qmotion.api.sizes import parse_size
    from qmotion.lab.lab import lab_up

    if accel not in ("auto", "kvm", "tcg"):
        fail(f"--accel must be auto, kvm or tcg, got {accel!r}", 2)
    pool: int | None = None
    if hugepages is not None:
        try:
            pool = 0 if hugepages.strip() == "0" else parse_size(hugepages)
        except ValueError as exc:
            fail(f"--hugepages: {exc}", 2)
    memory_mib: int | None = None
    if host_memory is not None:
        try:
            memory_mib = parse_size(host_memory) >> 20
        except ValueError as exc:
            fail(f"--host-memory: {exc}", 2)
    with errors_exit():
        lab = lab_up(
            name,
            hosts,
            rtt_ms=rtt_ms,
            bandwidth=bandwidth,
            accel=accel,
            hugepages=pool,
            migration_net=migration_net,
            insecure=insecure,
            host_cpus=host_cpus,
            host_memory_mib=memory_mib,
            postgres_db=postgres_db,
            managers=managers,
            lease_s=lease_s,
        )
    if json_out:
        print_json(lab.record.public())
        return
    rec = lab.record
    console.print(f"lab [bold]{escape(rec.name)}[/] is up: subnet {escape(str(rec.subnet))}")
    for h in rec.hosts:
        console.print(
            Text(f"  {h.name}: namespace {h.namespace}, address {h.address}, agent {h.agent_url}")
        )
        if h.migration_address:
            console.print(Text(f"      migration address {h.migration_address}"))
    console.print(Text(f"  client: namespace {rec.client_namespace}, address {rec.client_address}"))
    console.print(Text(f"  VM addresses: {rec.pool.first} - {rec.pool.last}"))
    if rec.replicas:
        db = "PostgreSQL" if rec.postgres_dir else "SQLite"
        urls = ", ".join([rec.manager_url or "", *(r.url for r in rec.replicas)])
        console.print(Text(f"  managers on {db} (lease {rec.lease_s:g} s): {urls}"))
    if rec.manager_url:
        # The console signs in with the manager's token (the built-in admin).
        console.print(
            Text(f"  web console: {rec.manager_url}/ui/ (token: {rec.manager_token_file})")
        )


@app.command("status")
def status(
    name: str = NameOpt,
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show the lab's hosts, client namespace, datastores and address pool."""
    from qmotion.lab.lab import status as lab_status

    with errors_exit():
        st = lab_status(name)
    if json_out:
        print_json(st)
        return
    console.print(f"lab [bold]{escape(str(st['name']))}[/] subnet {escape(str(st['subnet']))}")
    alive = st["agents_alive"]
    assert isinstance(alive, dict)
    for h in st["hosts"]:  # type: ignore[attr-defined]
        mark = "[green]up[/]" if alive.get(h["name"]) else "[red]down[/]"
        where = escape(f"  {h['name']}: {h['namespace']} {h['address']}")
        console.print(f"{where} agent {mark}")
    client = st["client"]
    assert isinstance(client, dict)
    console.print(Text(f"  client: {client['namespace']} {client['address']}"))
    for d in st["datastores"]:  # type: ignore[attr-defined]
        console.print(
            Text(f"  datastore {d['name']}: {d['path']} (hosts: {', '.join(d['hosts'])})")
        )


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    target: str = typer.Argument(..., help="Host name (h1, h2, ...) or 'client'."),
    command: list[str] = typer.Argument(..., help="Command to run inside the namespace."),
    name: str = NameOpt,
) -> None:
    """Run a command inside a host's or the client's namespace: lab exec client -- CMD..."""
    from qmotion.lab.lab import Lab

    with errors_exit():
        ns = Lab.load(name).namespace(target)
    os.execvp("ip", ["ip", "netns", "exec", ns, *command])


@app.command("down")
def down(name: str = NameOpt) -> None:
    """Stop every agent and VM of the lab and remove its namespaces, links and files."""
    from qmotion.lab import lab_down

    with errors_exit():
        removed = lab_down(name)
    console.print(Text(f"lab {name} is down ({len(removed)} items removed)"))
