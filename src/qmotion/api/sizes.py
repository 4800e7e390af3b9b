"""Parsing and printing of memory sizes and rates the way operators write them (512M, 1G, 20M/s)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|(B))?\s*$", re.IGNORECASE)
_BITRATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(BIT|BPS|B)?(?:/S)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, default_unit: str = "M") -> int:
    """Bytes from "512M", "1G", "1.5GiB", "4096K"; a bare number is in ``default_unit``.

    Units are binary (as QEMU's ``-m``): 1G = 1024 MiB.
    """
    if isinstance(text, bool):
        raise ValueError("expected a size such as 512M or 1G, got a boolean")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text * _UNITS[default_unit.upper()]
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512M, 1G, 1536MiB)")
    if m.group(2):
        scale = _UNITS[m.group(2).upper()]
    elif m.group(3):
        scale = 1
    else:
        scale = _UNITS[default_unit.upper()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def parse_rate_bytes(text: str) -> int:
    """Bytes per second from "20M/s", "100M" (bytes) or "1gbit", "800mbit" (bits)."""
    m = _BITRATE.match(text)
    if not m:
        raise ValueError(f"not a rate: {text!r} (expected e.g. 100M/s or 1gbit)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").upper()
    if suffix in ("BIT", "BPS"):
        # Network rates are decimal: 1gbit is 10^9 bits per second.
        dec = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
        value = int(number * dec / 8)
    else:
        value = int(number * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"rate must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    """Human form of a byte count, binary units, 3 significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)([smhd])")


def parse_duration_s(text: str) -> int:
    """Seconds in ``600``, ``600s``, ``10m``, ``2h``, ``1d`` or ``1h30m``; ValueError if not."""
    t = text.strip().lower()
    if t.isdigit():
        return int(t)
    parts = _DURATION.findall(t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"expected a duration such as 90s, 10m, 2h or 1h30m, got {text!r}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
