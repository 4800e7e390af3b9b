"""No agent is handed another's bearer token on a TLS cluster: the manager's instructions to a
source agent (path probes, switchover) name the destination's mutual-TLS port only."""

from __future__ import annotations

import asyncio

import pytest

from qmotion.agent.errors import OperationFailed
from qmotion.agent.network import netprobe
from qmotion.api.migration import PathProbeRequest, PeerRef
from qmotion.server.db import Host
from qmotion.server.tasks.measure import peer_of

SECRET = "destination-token-0123456789abcdef"


def _dst(**facts: object) -> Host:
    return Host(name="h2", agent_url="http://198.18.0.12:8100", token=SECRET, facts=facts)


def test_a_probe_on_a_tls_cluster_goes_to_the_peer_port_without_a_token() -> None:
    peer = peer_of(_dst(address="198.18.0.12", peer_port=8101), "web", tls=True)
    assert peer == PeerRef(url="https://198.18.0.12:8101", token=None, vm="web")
    sent = PathProbeRequest(peer=peer).model_dump_json()
    assert SECRET not in sent


def test_a_destination_without_its_peer_port_yet_gets_no_token_either() -> None:
    peer = peer_of(_dst(), "web", tls=True)
    assert peer.token is None


def test_only_an_insecure_cluster_passes_the_token_on() -> None:
    assert peer_of(_dst(address="198.18.0.12", peer_port=8101), "web", tls=False).token == SECRET


def test_the_source_refuses_a_tls_peer_without_a_certificate_of_its_own() -> None:
    req = PathProbeRequest(peer=PeerRef(url="https://198.18.0.12:8101", token=None, vm="web"))
    with pytest.raises(OperationFailed, match="no certificate"):
        asyncio.run(netprobe.probe(req, None))
