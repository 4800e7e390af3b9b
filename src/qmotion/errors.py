"""The root of every error qmotion raises on purpose.

Each package has its own root beneath this one (``ImageError``, ``LabError``,
``HypervisorError``, ``AgentError``, ``ClientError``, ...), so a caller can catch one package's
failures or all of qmotion's. Errors carry structured fields, not just a message.
"""

from __future__ import annotations


class QmotionError(Exception):
    """Base of all qmotion errors."""
