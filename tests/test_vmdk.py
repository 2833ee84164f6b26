"""The VMDK descriptor (storage.vmdk): twoGbMaxExtentFlat, FLAT extents in disk order, sizes
and offsets in 512-byte sectors (never bytes), every file split at 2 GiB. Sizes over 2 GiB are
checked on the descriptor alone: nothing of that size is written."""

from __future__ import annotations

import re

import pytest

from imageledger.domain.errors import MaterializeError
from imageledger.storage.vmdk import vmdk_descriptor

GIB = 1 << 30
EXTENT = re.compile(r'^RW (\d+) FLAT "([^"]+)" (\d+)$')


def extents(text: str) -> list[tuple[int, str, int]]:
    """(sectors, path, offset in sectors) of each extent line, parsed from the text."""
    return [(int(m[1]), m[2], int(m[3])) for line in text.splitlines() if (m := EXTENT.match(line))]


def test_a_small_disk_is_one_extent_per_file_in_order() -> None:
    text = vmdk_descriptor([("/h/fsmeta", 40960), ("/h/l1", 4096 * 312), ("/h/l2", 8192)])
    assert 'createType="twoGbMaxExtentFlat"' in text
    assert extents(text) == [(80, "/h/fsmeta", 0), (2496, "/h/l1", 0), (16, "/h/l2", 0)]
    assert text == vmdk_descriptor([("/h/fsmeta", 40960), ("/h/l1", 4096 * 312), ("/h/l2", 8192)])


def test_files_over_2_gib_split_with_offsets_in_sectors() -> None:
    big = 5 * GIB + 4096
    text = vmdk_descriptor([("/h/fsmeta", 8192), ("/h/big", big), ("/h/exact", 2 * GIB)])
    two_gib = 2 * GIB // 512
    assert extents(text) == [
        (16, "/h/fsmeta", 0),
        (two_gib, "/h/big", 0),
        (two_gib, "/h/big", two_gib),
        (GIB // 512 + 8, "/h/big", 2 * two_gib),
        (two_gib, "/h/exact", 0),
    ]
    # The extents cover each file exactly once, back to back.
    assert sum(s for s, p, _o in extents(text) if p == "/h/big") * 512 == big
    # The disk's size (geometry) is the sum of the files.
    cylinders = int(re.findall(r'ddb.geometry.cylinders = "(\d+)"', text)[0])
    assert cylinders == -(-(8192 + big + 2 * GIB) // 512 // (16 * 63))


@pytest.mark.parametrize(
    "extent",
    [("relative/path", 4096), ("/h/x", 1000), ("/h/x", 0), ('/h/"quoted"', 4096), ("/h/\n", 512)],
)
def test_what_a_descriptor_cannot_name_is_refused(extent: tuple[str, int]) -> None:
    with pytest.raises(MaterializeError):
        vmdk_descriptor([extent])
