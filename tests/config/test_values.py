"""Tests for :mod:`ckptwise.config.values`: durations and sizes as people write them."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptwise.config import format_duration, parse_bytes, parse_duration
from ckptwise.errors import ConfigError

# -- 6. durations and sizes ------------------------------------------------------------------

DURATIONS: list[tuple[object, timedelta]] = [
    ("90s", timedelta(seconds=90)),
    ("30m", timedelta(minutes=30)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h 30m", timedelta(hours=1, minutes=30)),
    ("1H30M", timedelta(hours=1, minutes=30)),
    ("2d", timedelta(days=2)),
    ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("1.5h", timedelta(minutes=90)),
    ("250ms", timedelta(milliseconds=250)),
    ("1s500ms", timedelta(seconds=1.5)),
    ("0.5s", timedelta(milliseconds=500)),
    (" 45m ", timedelta(minutes=45)),
    ("45", timedelta(seconds=45)),
    ("2.5", timedelta(seconds=2.5)),
    (90, timedelta(seconds=90)),
    (1.5, timedelta(seconds=1.5)),
    (0, timedelta(0)),
    (timedelta(hours=3), timedelta(hours=3)),
]


@pytest.mark.parametrize(("value", "expected"), DURATIONS, ids=[repr(v) for v, _ in DURATIONS])
def test_parse_duration(value: object, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value", ["30 minutes please", "", "h", "1x", "1h30", "-5s", "soon", True, None, [30]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"where\.it: .* is not a duration; write e\.g\. '90s'"):
        parse_duration(value, where="where.it")


FORMATTED: list[tuple[timedelta, str]] = [
    (timedelta(seconds=1), "1s"),
    (timedelta(seconds=90), "1m30s"),
    (timedelta(minutes=30), "30m"),
    (timedelta(hours=1), "1h"),
    (timedelta(hours=1, minutes=30), "1h30m"),
    (timedelta(days=2), "2d"),
    (timedelta(days=1, seconds=1), "1d1s"),
    (timedelta(days=1, hours=2, minutes=3, seconds=4), "1d2h3m4s"),
    (timedelta(days=400), "400d"),
    (timedelta(seconds=1.5), "1.5s"),
    (timedelta(milliseconds=250), "0.25s"),
    (timedelta(minutes=1, milliseconds=1), "60.001s"),
]


@pytest.mark.parametrize(("delta", "text"), FORMATTED, ids=[t for _, t in FORMATTED])
def test_format_duration(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text
    assert parse_duration(text) == delta


def test_format_duration_of_zero_reads_back() -> None:
    assert parse_duration(format_duration(timedelta(0))) == timedelta(0)


@given(st.integers(min_value=0, max_value=10**12))
def test_format_then_parse_whole_seconds(seconds: int) -> None:
    delta = timedelta(seconds=seconds)
    text = format_duration(delta)
    assert parse_duration(text) == delta
    assert format_duration(parse_duration(text)) == text
    if seconds:
        assert re.fullmatch(r"(\d+d)?(\d+h)?(\d+m)?(\d+s)?", text)


@given(st.integers(min_value=0, max_value=10**11))
def test_format_then_parse_whole_milliseconds(milliseconds: int) -> None:
    delta = timedelta(milliseconds=milliseconds)
    assert parse_duration(format_duration(delta)) == delta


@pytest.mark.parametrize("microseconds", [1, 50])
def test_format_then_parse_tiny_durations(microseconds: int) -> None:
    delta = timedelta(microseconds=microseconds)
    assert parse_duration(format_duration(delta)) == delta


SIZES: list[tuple[object, int]] = [
    (1024, 1024),
    (5.0, 5),
    ("100", 100),
    ("100B", 100),
    ("1kb", 1000),
    ("1K", 1000),
    ("1KiB", 1024),
    ("1Ki", 1024),
    ("10KiB", 10_240),
    ("1.5KiB", 1536),
    ("500MB", 500_000_000),
    ("500mb", 500_000_000),
    ("22GB", 22_000_000_000),
    (" 7 GB ", 7_000_000_000),
    ("1.5GiB", 1_610_612_736),
    ("2TB", 2 * 10**12),
    ("1TiB", 2**40),
    ("1PiB", 2**50),
    ("3PB", 3 * 10**15),
    ("0.5KB", 500),
]


@pytest.mark.parametrize(("value", "expected"), SIZES, ids=[repr(v) for v, _ in SIZES])
def test_parse_bytes(value: object, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "", "GB", "1XB", "-5GB", "1 0GB", True, 1.5, None])
def test_parse_bytes_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"keep\.budget: .* is not a size; write e\.g\. '22GB'"):
        parse_bytes(value, where="keep.budget")


@pytest.mark.parametrize(
    ("value", "expected"), [("2.01KB", 2010), ("2.01GB", 2_010_000_000), ("2.03MB", 2_030_000)]
)
def test_parse_bytes_decimal_fractions_are_exact(value: str, expected: int) -> None:
    assert parse_bytes(value) == expected
