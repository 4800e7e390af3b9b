"""What `make install` puts on a real host: systemd units that systemd accepts and that keep VMs
running across an agent restart, and example configs every key of which the services take."""

from __future__ import annotations

import configparser
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from qmotion.cli import config as config_file
from qmotion.cli.main import app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("qmotion-manager.service", "qmotion-agent.service")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name)
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's qmotion.
    qmotion = Path(sys.executable).with_name("qmotion")
    token = tmp_path / "token"
    token.write_text("t" * 32)
    paths = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        text = text.replace("/usr/local/bin/qmotion", str(qmotion))
        text = text.replace("/etc/qmotion/manager.token", str(token))
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    done = subprocess.run(
        ["systemd-analyze", "verify", *paths], capture_output=True, text=True, check=False
    )
    # verify exits 0 on settings it ignores; anything it says about our files is a defect.
    said = [line for line in done.stderr.splitlines() if str(tmp_path) in line]
    assert done.returncode == 0 and not said, done.stderr


def test_an_agent_restart_signals_only_the_agent() -> None:
    service = _unit("qmotion-agent.service")["Service"]
    # control-group (the default) would kill every QEMU with the agent.
    assert service["KillMode"] == "process"
    # /run/qmotion holds the running VMs' monitor sockets: kept across a restart.
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert service["UMask"] == "0077"
    # Root's, passable by QEMU's user and never by group: systemd re-owns a state directory
    # (recursively, its VMs' files too) whose owner or group is not the service's.
    assert service["StateDirectoryMode"] == "0711" and service["RuntimeDirectoryMode"] == "0711"


def test_the_manager_runs_unprivileged_with_its_token_as_a_credential() -> None:
    service = _unit("qmotion-manager.service")["Service"]
    assert service["DynamicUser"] == "yes" and service["NoNewPrivileges"] == "yes"
    assert "--token-file %d/token" in service["ExecStart"]


def _params(*path: str) -> dict[str, Any]:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params if p.name}


@pytest.mark.parametrize(
    ("example", "command"), [("manager.toml", "server"), ("agent.toml", "agent")]
)
def test_every_key_of_the_examples_is_a_flag(example: str, command: str) -> None:
    values = config_file.load(DEPLOY / "etc" / example, _params(command))
    assert values  # the example sets something (not all commented out)


def test_an_unknown_or_mistyped_key_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('name = "h1"\nlisten-adress = "198.18.0.11:8100"\n')
    with pytest.raises(typer.BadParameter, match="listen-adress"):
        config_file.load(bad, _params("agent"))
    bad.write_text('datastore = "local=/srv"\n')
    with pytest.raises(typer.BadParameter, match="datastore must be a list"):
        config_file.load(bad, _params("agent"))


def test_flags_override_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file's values become defaults; a flag given wins (server --listen here)."""
    from typer.testing import CliRunner

    from qmotion.server import main as server_main

    seen: dict[str, object] = {}
    monkeypatch.setattr(
        server_main,
        "run",
        lambda db, token, host, *rest, **kw: seen.update(db=db, host=host, replica=kw["replica"]),
    )
    conf = tmp_path / "manager.toml"
    db = f"sqlite:///{tmp_path / 'm.db'}"
    conf.write_text(f'listen = "198.18.0.1:8000"\ndb = "{db}"\ninsecure = true\n')
    (tmp_path / "tok").write_text("t" * 32)
    args = ["server", "--config", str(conf), "--token-file", str(tmp_path / "tok")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # The replica's name defaults to where it serves: stable across restarts.
    assert seen == {"db": db, "host": "198.18.0.1", "replica": f"{socket.gethostname()}:8000"}
    res = CliRunner().invoke(app, [*args, "--listen", "198.18.0.9:8000"])
    assert res.exit_code == 0 and seen["host"] == "198.18.0.9"
