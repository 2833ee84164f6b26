"""The VMDK descriptor that joins an image's fsmeta and layer images into one read-only disk.

A ``twoGbMaxExtentFlat`` descriptor: text naming FLAT extents (``RW <sectors> FLAT "<path>"
<offset>``), read in order as one disk. Sizes and offsets are 512-byte sectors, never bytes
(a runtime that read the offset as bytes once corrupted every image over 2 GiB), and each file
is split into extents of at most 2 GiB, the next starting where the last ended in the same
file. The disk is fsmeta then the layers bottom to top: the order `erofs.build_fsmeta`'s
device table maps (each layer's ``mapped_blkaddr`` is where its first extent lands).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from imageledger.domain.errors import MaterializeError

SECTOR: Final = 512
MAX_EXTENT_SECTORS: Final = (2 << 30) // SECTOR
"""2 GiB in sectors: the most one extent line covers."""
_HEADS: Final = 16
_SECTORS_PER_TRACK: Final = 63


def extent_lines(extents: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(path, sectors, offset in sectors within that file) of every extent line, in disk
    order: each file split at 2 GiB."""
    lines: list[tuple[str, int, int]] = []
    for path, size in extents:
        if not path.startswith("/"):
            raise MaterializeError(f"VMDK extent {path!r}: not an absolute path")
        if '"' in path or "\n" in path or "\r" in path:
            raise MaterializeError(f"VMDK extent {path!r}: a quote or newline in the path")
        if size <= 0 or size % SECTOR:
            raise MaterializeError(f"VMDK extent {path}: {size} bytes is not whole sectors")
        sectors = size // SECTOR
        offset = 0
        while offset < sectors:
            count = min(MAX_EXTENT_SECTORS, sectors - offset)
            lines.append((path, count, offset))
            offset += count
    return lines


def vmdk_descriptor(extents: Sequence[tuple[str, int]]) -> str:
    """The descriptor of the disk joining `extents` ((absolute path, size in bytes) in disk
    order: fsmeta, then the layers bottom to top). Deterministic text: no CID drawn at
    random (``fffffffe``, as no parent is named), geometry from the total size."""
    lines = extent_lines(extents)
    total = sum(sectors for _path, sectors, _offset in lines)
    cylinders = -(-total // (_HEADS * _SECTORS_PER_TRACK))
    text = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        "CID=fffffffe",
        "parentCID=ffffffff",
        'createType="twoGbMaxExtentFlat"',
        "",
        "# Extent description",
        *(f'RW {sectors} FLAT "{path}" {offset}' for path, sectors, offset in lines),
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        f'ddb.geometry.cylinders = "{cylinders}"',
        f'ddb.geometry.heads = "{_HEADS}"',
        f'ddb.geometry.sectors = "{_SECTORS_PER_TRACK}"',
        'ddb.adapterType = "ide"',
        "",
    ]
    return "\n".join(text)


__all__ = ["MAX_EXTENT_SECTORS", "SECTOR", "extent_lines", "vmdk_descriptor"]
