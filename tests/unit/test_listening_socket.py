"""The agent's listening sockets hand connections that send at once (no Nagle wait)."""

from __future__ import annotations

import socket

from qmotion.agent.tls import listening_socket


def _accepted_nodelay(listener: socket.socket) -> int:
    listener.listen(1)
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        conn, _ = listener.accept()
        with conn:
            client.sendall(b"x")
            assert conn.recv(1) == b"x"
            return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_connection_the_agent_accepts_has_nagle_off() -> None:
    """uvicorn writes a response's headers and body apart: with Nagle on, the body waits
    for the client's delayed ACK (~40 ms on every agent call)."""
    with listening_socket("127.0.0.1", 0) as listener:
        assert _accepted_nodelay(listener) != 0


def test_a_plain_socket_would_not_have_it() -> None:
    """The control: a listening socket made the default way (proto 0, which asyncio does
    not treat as TCP) hands its connections Nagle on, so the first test can fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        plain.bind(("127.0.0.1", 0))
        assert plain.proto == 0
        assert _accepted_nodelay(plain) == 0
