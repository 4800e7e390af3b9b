"""`qmotion image upload`: a local image streamed through the real manager app to a real agent
app (in-process, real qemu-img), checked there and added to the library."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from qmotion.agent.app import create_app as create_agent
from qmotion.agent.config import AgentConfig, DatastoreConfig
from qmotion.client.errors import ApiError
from qmotion.client.server import ServerClient
from qmotion.server.agents import AgentConnector
from qmotion.server.db import Database, Host, utcnow
from qmotion.server.http.app import create_app as create_manager

TOKEN = "t" * 32
ROOT = "service-token-0123456789abcdef"


class _AgentTransport(httpx.ASGITransport, httpx.BaseTransport):
    """The in-process agent, for the connector's streamed (async) calls."""


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[ServerClient, Path]]:
    store = tmp_path / "ds"
    store.mkdir()
    agent = create_agent(
        AgentConfig(
            name="h1",
            state_dir=tmp_path / "state",
            token=TOKEN,
            run_dir=tmp_path / "run",
            datastores=(DatastoreConfig("ds", store, True),),
        )
    )
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    with db.session() as s:
        s.add(
            Host(
                name="h1",
                agent_url="http://h1.test:8100",
                token=TOKEN,
                state="up",
                facts={"datastores": [{"name": "ds", "path": str(store), "shared": True}]},
                last_seen=utcnow(),
            )
        )
    db.engine.dispose()
    agents = AgentConnector(transport=lambda _url: _AgentTransport(app=agent))
    with TestClient(create_manager(url, ROOT, agents=agents)) as tc:
        yield ServerClient("http://testserver", ROOT, transport=tc._transport), store


def _image(path: Path, *extra: str) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "64M"], check=True
    )
    return path


def test_an_uploaded_image_lands_checked_in_the_library(
    manager: tuple[ServerClient, Path], tmp_path: Path
) -> None:
    client, store = manager
    local = _image(tmp_path / "local.qcow2")
    seen: list[int] = []
    out = client.upload_image(local, "base", progress=seen.append)
    assert (out.name, out.format, out.datastore, out.host) == ("base", "qcow2", "ds", "h1")
    assert out.virtual_size == 64 << 20 and out.source.startswith("upload from ")
    assert seen[-1] == local.stat().st_size
    assert sorted(p.name for p in (store / ".images").iterdir()) == ["base.qcow2"]
    assert [i.name for i in client.images()] == ["base"]


def test_an_image_with_a_backing_file_is_refused_and_nothing_is_left(
    manager: tuple[ServerClient, Path], tmp_path: Path
) -> None:
    client, store = manager
    # It would read a file of the datastore (another VM's disk) into the image.
    (store / "secret.raw").write_bytes(b"secret" * 1000)
    sneaky = _image(tmp_path / "sneaky.qcow2", "-u", "-b", "../secret.raw", "-F", "raw")
    with pytest.raises(ApiError) as refused:
        client.upload_image(sneaky, "sneaky")
    assert refused.value.status == 422 and refused.value.detail.field == "file"
    assert "backing file" in refused.value.detail.message
    assert list((store / ".images").iterdir()) == []
    assert client.images() == []
    with pytest.raises(ApiError) as nowhere:
        client.upload_image(_image(tmp_path / "ok.qcow2"), "ok", datastore="nfs9")
    assert nowhere.value.status == 422 and nowhere.value.detail.field == "datastore"
    assert list((store / ".images").iterdir()) == []
