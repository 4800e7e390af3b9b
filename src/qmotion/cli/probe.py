"""``qmotion probe``: talk to a built guest over the network (run inside the right namespace)."""

from __future__ import annotations

import dataclasses

import typer

from qmotion.cli.common import fail, print_json

app = typer.Typer(help="Probe a built test guest: echo, echo stream, memory and disk checks.")


@app.command("echo")
def echo(
    address: str,
    wait: float = typer.Option(0.0, help="Keep trying for this many seconds."),
) -> None:
    """One TCP echo round trip to port 7000."""
    from qmotion.probe.guest import ProbeError, echo_once, wait_echo

    try:
        rtt = echo_once(address) if wait <= 0 else wait_echo(address, wait)
    except (OSError, ProbeError) as exc:
        fail(f"echo {address}: {exc}")
    print_json({"address": address, "ok": True, "seconds": round(rtt, 4)})


@app.command("mem")
def mem(address: str) -> None:
    """Run the guest's memory-integrity check; exit 1 if any page is inconsistent."""
    from qmotion.probe.guest import ProbeError, mem_check

    try:
        result = mem_check(address)
    except (OSError, ProbeError) as exc:
        fail(f"mem check {address}: {exc}")
    print_json(result)
    if not result.get("consistent"):
        raise typer.Exit(1)


@app.command("disk")
def disk(address: str) -> None:
    """Verify every acknowledged disk record; exit 1 if any was lost."""
    from qmotion.probe.guest import ProbeError, disk_verify

    try:
        result = disk_verify(address)
    except (OSError, ProbeError) as exc:
        fail(f"disk verify {address}: {exc}")
    print_json(result)
    if not result.get("intact"):
        raise typer.Exit(1)


@app.command("stream")
def stream(
    address: str,
    duration: float = typer.Option(10.0, help="Seconds to hold the session."),
    interval_ms: float = typer.Option(5.0, help="Pause between messages."),
    stop_file: str = typer.Option(None, help="End early when this file appears."),
) -> None:
    """Hold one TCP echo session; report the largest gap between replies (the blackout)."""
    from qmotion.probe.guest import ProbeError, echo_stream

    try:
        result = echo_stream(address, duration, interval_ms / 1000, stop_file)
    except (OSError, ProbeError) as exc:
        fail(f"stream {address}: {exc}")
    out = dataclasses.asdict(result)
    out["survived"] = result.survived
    print_json(out)
    if not result.survived:
        raise typer.Exit(1)
