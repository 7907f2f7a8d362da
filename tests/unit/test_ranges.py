"""Range, Content-Range and Content-Length parsing (cargohold/oci/ranges.py): issue 12 item 10."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, strategies as st

from cargohold.oci import errors
from cargohold.oci.ranges import SATURATED, decimal, parse_chunk_range, parse_range

HUGE = "9" * 4400       # past Python's 4,300-digit int() limit


def test_decimal_reads_digits_only_and_saturates():
    assert decimal("0") == 0 and decimal("007") == 7 and decimal("123") == 123
    assert decimal(HUGE) == SATURATED and decimal("0" * 5000 + "5") == 5
    for bad in (None, "", "-1", "+1", "1.0", " 1", "١٢", "0x10"):
        assert decimal(bad) is None


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-9", (0, 9)), ("bytes=5-", (5, 99)), ("bytes=-10", (90, 99)), ("bytes=90-200", (90, 99)),
    (f"bytes=0-{HUGE}", (0, 99)), (f"bytes=-{HUGE}", (0, 99)), ("items=0-1", None), ("bytes=0-1,5-6", None),
])
def test_ranges(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}", "bytes=100-", "bytes=-0",
                                    "bytes=-", "bytes=5-2", "bytes=a-b"])
def test_unsatisfiable_ranges_answer_416(header):
    with pytest.raises(errors.RegistryError) as info:
        parse_range(header, 100)
    assert info.value.status == 416 and info.value.headers["Content-Range"] == "bytes */100"


@pytest.mark.parametrize("content_range", [f"0-{HUGE}", f"{HUGE}-{HUGE}", f"bytes={HUGE}-1", "5-2", "x"])
def test_bad_content_ranges_answer_416(content_range):
    with pytest.raises(errors.RegistryError) as info:
        parse_chunk_range(content_range, None)
    assert info.value.status == 416


def test_chunk_ranges():
    assert parse_chunk_range("0-9", "10") == (0, 10)
    assert parse_chunk_range(None, HUGE) == (None, SATURATED)
    assert parse_chunk_range(None, "abc") == (None, None)


@given(st.text(max_size=60), st.integers(min_value=1, max_value=2 ** 40))
def test_range_parsing_never_crashes_and_stays_inside_the_blob(text, size):
    try:
        wanted = parse_range(text, size)
    except errors.RegistryError as exc:
        assert exc.status == 416
        return
    if wanted is not None:
        start, end = wanted
        assert 0 <= start <= end < size


@given(st.one_of(st.none(), st.text(max_size=60), st.from_regex(r"\Abytes=\d{0,5000}-\d{0,5000}\Z")),
       st.one_of(st.none(), st.text(max_size=20), st.from_regex(r"\A\d{1,5000}\Z")))
def test_chunk_range_parsing_never_crashes(content_range, content_length):
    try:
        start, length = parse_chunk_range(content_range, content_length)
    except errors.RegistryError as exc:
        assert exc.status == 416
        return
    assert start is None or 0 <= start < SATURATED
    assert length is None or 0 <= length <= SATURATED


@given(st.from_regex(r"\A(bytes=)?\d{0,5000}-\d{0,5000}\Z"), st.integers(min_value=1, max_value=2 ** 40))
def test_long_numbers_in_ranges_never_crash(text, size):
    test_range_parsing_never_crashes_and_stays_inside_the_blob.hypothesis.inner_test(text, size)


@given(st.text(max_size=80))
def test_content_length_like_headers_never_crash(text):
    value = decimal(text)
    assert value is None or 0 <= value <= SATURATED


@given(st.text(max_size=200))
def test_logged_paths_hold_no_line_breaks_or_control_characters(text):
    from cargohold.node.http import loggable

    logged = loggable(text)
    assert len(logged.splitlines()) <= 1                                   # no line break of any kind
    assert not any(unicodedata.category(c) == "Cc" for c in logged)      # no NUL, ESC, ...
    if text.isprintable() and "\\" not in text:
        assert logged == text
