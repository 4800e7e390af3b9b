"""The ``qmotion`` command: its command groups, wired together."""

from __future__ import annotations

import typer

from qmotion.cli import agent, demo, image, lab, probe

app = typer.Typer(
    name="qmotion",
    no_args_is_help=True,
    add_completion=False,
    help="Live migration and cluster automation for QEMU/KVM virtual machines.",
)
app.add_typer(image.app, name="image")
app.add_typer(lab.app, name="lab")
app.add_typer(probe.app, name="probe")
app.command("agent")(agent.agent)
app.command("demo")(demo.demo)
