"""Typed HTTP clients of qmotion's APIs; the CLI and any UI talk to services only through these.

Imports only the ground floor (``qmotion.api``, errors): a UI can use them without the
manager's code.
"""

from qmotion.client.agent import AgentClient
from qmotion.client.errors import (
    ApiError,
    ClientError,
    Conflict,
    Invalid,
    NotFound,
    ServerError,
    Unauthorized,
    Unreachable,
)
from qmotion.client.server import ServerClient

__all__ = [
    "AgentClient",
    "ApiError",
    "ClientError",
    "Conflict",
    "Invalid",
    "NotFound",
    "ServerClient",
    "ServerError",
    "Unauthorized",
    "Unreachable",
]
