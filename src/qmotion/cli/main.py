"""The ``qmotion`` command: its command groups, wired together."""

from __future__ import annotations

import typer

from qmotion import __version__
from qmotion.cli import (
    agent,
    audit,
    cluster,
    demo,
    drs,
    host,
    image,
    lab,
    probe,
    rule,
    schedule,
    server,
    task,
    user,
    vm,
)

app = typer.Typer(
    name="qmotion",
    no_args_is_help=True,
    # --install-completion / --show-completion for bash, zsh, fish and PowerShell.
    add_completion=True,
    help="Live migration and cluster automation for QEMU/KVM virtual machines.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qmotion {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Live migration and cluster automation for QEMU/KVM virtual machines."""


app.add_typer(image.app, name="image")
app.add_typer(lab.app, name="lab")
app.add_typer(probe.app, name="probe")
app.add_typer(vm.app, name="vm")
app.add_typer(task.app, name="task")
app.add_typer(host.app, name="host")
app.add_typer(drs.app, name="drs")
app.add_typer(schedule.app, name="schedule")
app.add_typer(rule.app, name="rule")
app.add_typer(cluster.app, name="cluster")
app.add_typer(user.app, name="user")
app.add_typer(audit.app, name="audit")
app.add_typer(server.app, name="server")
app.add_typer(agent.app, name="agent")
app.command("demo")(demo.demo)
