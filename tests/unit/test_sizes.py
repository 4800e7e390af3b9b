"""Sizes and rates are parsed the way operators write them, and refused clearly otherwise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmotion.api.sizes import format_size, parse_rate_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("1.5GiB", 1536 << 20),
        ("4096K", 4 << 20),
        ("512", 512 << 20),
        ("100B", 100),
        ("2g", 2 << 30),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5M", "0", "1X", "M512"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(["K", "M", "G"]))
def test_size_units_scale_by_1024(n: int, unit: str) -> None:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    assert parse_size(f"{n}{unit}") == n * scale
    assert parse_size(f"{n}{unit}iB") == n * scale


def test_rates_bits_are_decimal_bytes_binary() -> None:
    assert parse_rate_bytes("1gbit") == 125_000_000
    assert parse_rate_bytes("20M/s") == 20 << 20
    with pytest.raises(ValueError, match="rate"):
        parse_rate_bytes("fast")


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(600 << 20) == "600 MiB"
