"""`rows_json`, the fast path of `images --json`, prints exactly what `json.dumps(indent=2)`
printed before it: scripts may compare the output byte for byte."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from imageledger.tools.cli import Scalar, rows_json

# Text that could imitate a seam between rows: braces, commas, quotes, newlines, escapes.
TEXT = st.text(alphabet=st.sampled_from('{},:" \n\\\x1b\u2028\u202eaZ9é'), max_size=12) | st.text()
SCALARS: st.SearchStrategy[Scalar] = st.one_of(
    TEXT,
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
ROW = st.dictionaries(TEXT, SCALARS, min_size=1, max_size=8)


@given(st.lists(ROW, max_size=6))
def test_rows_json_is_json_dumps_with_indent_2(rows: list[dict[str, Scalar]]) -> None:
    assert rows_json(rows) == json.dumps(rows, indent=2)


def test_rows_json_of_no_rows() -> None:
    assert rows_json([]) == json.dumps([], indent=2) == "[]"
