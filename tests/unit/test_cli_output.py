"""The CLI prints data literally: a MAC, a name or a message is never read as Rich emoji codes
(``:cd:`` -> a CD), markup (``[bold]``, ``[/]``) or highlighted.

Each command runs through Typer against a fake manager client, so what is checked is what a
user sees: every string below must come out exactly as it went in.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from qmotion.api.errors import ErrorDetail
from qmotion.api.migration import MigrationPhase
from qmotion.api.server import HostOut, TaskEventOut, TaskOut, TaskState, VmOut
from qmotion.api.vm import VmState
from qmotion.cli import common, host, task, vm
from qmotion.cli.main import app
from qmotion.client.errors import NotFound
from qmotion.client.paging import Page
from qmotion.errors import QmotionError

MAC = "52:54:00:cd:4f:4c"
EMOJI = ":smile:"
MARKUP = "[bold red]x[/]"
CLOSE = "[/]"
DATA = (MAC, EMOJI, MARKUP, CLOSE)
# What Rich would make of them: the emoji, or the markup eaten.
MANGLED = ("\N{OPTICAL DISC}", "\N{SMILING FACE WITH OPEN MOUTH AND SMILING EYES}")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
runner = CliRunner()
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def _run(args: list[str]) -> Result:
    # Wide enough that no cell wraps; COLUMNS is read by Rich on every render.
    return runner.invoke(app, args, env={"COLUMNS": "250"})


def _text(s: str) -> str:
    return ANSI.sub("", s)


def _assert_literal(out: str, *expected: str) -> None:
    out = _text(out)
    for s in expected:
        assert s in out, f"{s!r} not printed literally in:\n{out}"
    for m in MANGLED:
        assert m not in out, out


def _vm() -> VmOut:
    return VmOut(
        name=MARKUP,
        uuid="0b7c",
        host=EMOJI,
        state=VmState.RUNNING,
        mac=MAC,
        address=f"10.0.0.5/24 {CLOSE}",
        cpu_model="qemu64 :cd:",
        machine="pc",
        memory_mib=512,
        vcpus=1,
    )


def _task(*, error: str | None = None) -> TaskOut:
    return TaskOut(
        id=7,
        kind="migrate",
        state=TaskState.FAILED if error else TaskState.SUCCEEDED,
        vm=MARKUP,
        source=EMOJI,
        destination=CLOSE,
        phase=MigrationPhase.MONITOR,
        progress=0.5,
        created_at=NOW,
        started_at=NOW,
        ended_at=NOW,
        error=error,
        result=None,
        stats=None,
        events=[
            TaskEventOut(at=NOW, kind=EMOJI, message=f"vm {MARKUP} mac {MAC} {CLOSE}"),
        ],
    )


class FakeClient:
    """The few ServerClient calls the commands make, answering with awkward data."""

    def __init__(self, error: Exception | None = None, task_error: str | None = None) -> None:
        self.error = error
        self.task_error = task_error

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _answer(self, value: Any) -> Any:
        if self.error is not None:
            raise self.error
        return value

    def vms(self) -> list[VmOut]:
        return self._answer([_vm()])  # type: ignore[no-any-return]

    def vm_page(self, *, limit: int | None = None, after: str | None = None) -> Page[VmOut]:
        return Page(self.vms(), None)

    def vm(self, name: str) -> VmOut:
        return self._answer(_vm())  # type: ignore[no-any-return]

    def create_vm(self, req: object) -> VmOut:
        return self._answer(_vm())  # type: ignore[no-any-return]

    def start_vm(self, name: str) -> VmOut:
        return self._answer(_vm())  # type: ignore[no-any-return]

    def stop_vm(self, name: str, *, force: bool = False) -> VmOut:
        return self._answer(_vm())  # type: ignore[no-any-return]

    def delete_vm(self, name: str, *, force: bool = False) -> None:
        self._answer(None)

    def tasks(self) -> list[TaskOut]:
        return self._answer([_task(error=self.task_error)])  # type: ignore[no-any-return]

    def task_page(self, *, limit: int | None = None, after: int | None = None) -> Page[TaskOut]:
        return Page(self.tasks(), None)

    def task(self, task_id: int) -> TaskOut:
        return self._answer(_task(error=self.task_error))  # type: ignore[no-any-return]

    def cancel_task(self, task_id: int) -> TaskOut:
        return self._answer(_task())  # type: ignore[no-any-return]

    def migrate(self, name: str, req: object) -> TaskOut:
        return self._answer(_task(error=self.task_error))  # type: ignore[no-any-return]

    def hosts(self) -> list[HostOut]:
        return self._answer(  # type: ignore[no-any-return]
            [
                HostOut(
                    name=MARKUP,
                    agent_url="http://h1",
                    state="up",
                    last_seen=None,
                    vms=[EMOJI, MAC, CLOSE],
                    memory_mib=4096,
                    committed_mib=512,
                    facts=None,
                )
            ]
        )


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    fake = FakeClient()
    for module in (vm, task, host):
        monkeypatch.setattr(module, "server_client", lambda lab=None: fake)
    return fake


def test_the_consoles_neither_substitute_emoji_nor_highlight() -> None:
    for console in (common.console, common.err_console):
        text = console.render_str(f"{MAC} {EMOJI} 10.0.0.5 'h1' /var/lib/x", markup=False)
        assert text.plain == f"{MAC} {EMOJI} 10.0.0.5 'h1' /var/lib/x"
        assert not text.spans  # no highlighter colouring numbers, addresses or strings


@pytest.mark.parametrize(
    "args",
    [
        ["vm", "list"],
        ["vm", "show", "x"],
        ["vm", "create", "x", "--host", "h1", "--memory", "512M"],
    ],
)
def test_vm_table_prints_name_mac_and_host_literally(client: FakeClient, args: list[str]) -> None:
    res = _run(args)
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, *DATA, f"10.0.0.5/24 {CLOSE}", "qemu64 :cd:")


def _rack_vm(i: int, attention: str | None = None) -> VmOut:
    return VmOut(
        name=f"web-frontend-{i:02d}",
        uuid="0b7c",
        host="host-rack12-b",
        state=VmState.RUNNING,
        mac=f"52:54:00:be:ef:{i:02x}",
        address=f"198.18.1.{100 + i}/24",
        cpu_model="Skylake-Server-v4",
        machine="pc",
        memory_mib=4096,
        vcpus=2,
        migrating=i == 0,
        attention=attention,
    )


@pytest.mark.parametrize("attention", [None, "two copies"])
def test_vm_list_in_80_columns_never_cuts_names_addresses_or_macs(
    client: FakeClient, monkeypatch: pytest.MonkeyPatch, attention: str | None
) -> None:
    """Rich cut them to fit (``198.18.1.100…``, ``52:54:00:be…``); the columns less worth
    copying go first, and an attention note moves below the table."""
    vms = [_rack_vm(0), _rack_vm(1, attention), _rack_vm(2)]
    monkeypatch.setattr(client, "vms", lambda: vms)
    res = runner.invoke(app, ["vm", "list"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    out = _text(res.stdout)
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "\N{HORIZONTAL ELLIPSIS}" not in out
    for v in vms:
        row = next(line for line in out.splitlines() if v.name in line)
        for whole in (v.host, v.address or "", v.mac):
            assert whole in row, (whole, out)
    assert "Skylake-Server-v4" not in out  # the first column to go
    if attention:
        assert "web-frontend-01 needs attention: two copies" in out
    wide = _text(runner.invoke(app, ["vm", "list"], env={"COLUMNS": "200"}).stdout)
    assert "Skylake-Server-v4" in wide and "4096 MiB" in wide


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["vm", "start", "x"], f"{MARKUP} is running on {EMOJI}"),
        (["vm", "stop", "x"], f"{MARKUP} is running"),
        (["vm", "delete", MARKUP], f"{MARKUP} deleted"),
    ],
)
def test_vm_start_stop_delete_lines(client: FakeClient, args: list[str], line: str) -> None:
    res = _run(args)
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, line)


def test_vm_migrate_progress_and_report(client: FakeClient) -> None:
    client.task_error = f"agent said {MARKUP} {CLOSE} {EMOJI} {MAC}"
    res = _run(["vm", "migrate", "x", "--to", "h2"])
    assert res.exit_code == 1, res.output
    # The progress line names the VM and its hosts; the report and the error follow.
    _assert_literal(res.stdout, f"{MARKUP} {EMOJI}->{CLOSE}", client.task_error)


def test_task_show_prints_events_and_error_literally(client: FakeClient) -> None:
    client.task_error = f"boom {MARKUP} {CLOSE} {EMOJI}"
    res = _run(["task", "show", "7"])
    assert res.exit_code == 0, res.output
    _assert_literal(
        res.stdout,
        f"task 7 migrate {MARKUP}:",
        f"error: {client.task_error}",
        f"{EMOJI}: vm {MARKUP} mac {MAC} {CLOSE}",
    )


def test_task_list_and_cancel(client: FakeClient) -> None:
    res = _run(["task", "list"])
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, MARKUP, EMOJI, CLOSE)
    res = _run(["task", "cancel", "7"])
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, "task 7: cancel requested")


def test_host_list(client: FakeClient) -> None:
    res = _run(["host", "list"])
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, MARKUP, f"{EMOJI}, {MAC}, {CLOSE}")


def test_api_error_message_is_printed_literally(client: FakeClient) -> None:
    detail = ErrorDetail(
        code="vm_not_found", message=f"no VM {MARKUP} with MAC {MAC} {EMOJI}", vm=CLOSE
    )
    client.error = NotFound(404, detail)
    res = _run(["vm", "show", "x"])
    assert res.exit_code == 2
    assert res.stdout == ""
    _assert_literal(res.stderr, f"error: {detail.message} (vm={CLOSE}) [vm_not_found]")


def test_qmotion_error_message_is_printed_literally(client: FakeClient) -> None:
    client.error = QmotionError(f"{MARKUP} {CLOSE} {EMOJI} {MAC}")
    res = _run(["task", "list"])
    assert res.exit_code == 1
    _assert_literal(res.stderr, f"error: {MARKUP} {CLOSE} {EMOJI} {MAC}")


def test_fail_escapes_its_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exc:
        common.fail(f"{MARKUP} {CLOSE} {EMOJI} {MAC}", 3)
    assert exc.value.exit_code == 3
    err = _text(capsys.readouterr().err)
    assert err == f"error: {MARKUP} {CLOSE} {EMOJI} {MAC}\n"


def test_bad_option_value_is_echoed_literally() -> None:
    res = _run(["vm", "create", "x", "--host", "h1", "--memory", f"{MAC}{MARKUP}"])
    assert res.exit_code == 2
    _assert_literal(res.stderr, f"{MAC}{MARKUP}")


def test_drs_plan_and_place_print_names_literally(tmp_path: Path) -> None:
    snap = tmp_path / "cluster.json"
    snap.write_text(
        json.dumps(
            {
                "hosts": [
                    {"name": MARKUP, "cpu_capacity": 8, "memory_mib": 16384, "maintenance": True},
                    {"name": EMOJI, "cpu_capacity": 8, "memory_mib": 16384},
                ],
                "vms": [{"name": MAC, "host": MARKUP, "memory_mib": 1024}],
            }
        )
    )
    res = _run(["drs", "plan", "--snapshot", str(snap)])
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, MAC, MARKUP, EMOJI)
    res = _run(["drs", "place", "--snapshot", str(snap), "--vm", '{"name": "v", "memory_mib": 1}'])
    assert res.exit_code == 0, res.output
    _assert_literal(res.stdout, f"ok {EMOJI} score", f"no {MARKUP} score")


def test_lab_status_prints_names_and_paths_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    import qmotion.lab.lab

    status = {
        "name": MARKUP,
        "subnet": "10.0.0.0/24",
        "agents_alive": {EMOJI: True},
        "hosts": [{"name": EMOJI, "namespace": CLOSE, "address": MAC}],
        "client": {"namespace": f"ns{CLOSE}", "address": "10.0.0.2"},
        "datastores": [{"name": "shared", "path": f"/srv/{EMOJI}/{MARKUP}", "hosts": [EMOJI]}],
    }
    monkeypatch.setattr(qmotion.lab.lab, "status", lambda name: status)
    res = _run(["lab", "status"])
    assert res.exit_code == 0, res.output
    _assert_literal(
        res.stdout,
        f"lab {MARKUP} subnet",
        f"{EMOJI}: {CLOSE} {MAC} agent up",
        f"client: ns{CLOSE} 10.0.0.2",
        f"datastore shared: /srv/{EMOJI}/{MARKUP} (hosts: {EMOJI})",
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["vm", "start", "x", "--json"], {"name": MARKUP, "host": EMOJI, "state": "running"}),
        (["vm", "stop", "x", "--json"], {"name": MARKUP, "state": "running"}),
        (["vm", "delete", MARKUP, "--json"], {"deleted": MARKUP}),
        (["task", "cancel", "7", "--json"], {"id": 7}),
    ],
)
def test_lifecycle_commands_print_json_when_asked(
    client: FakeClient, args: list[str], expected: dict[str, Any]
) -> None:
    """Operators script these: --json gives the API's object (or what was deleted), and
    nothing else on stdout."""
    res = _run(args)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert {k: got[k] for k in expected} == expected, got


def test_version() -> None:
    res = _run(["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == "qmotion 0.1.0", res.output
