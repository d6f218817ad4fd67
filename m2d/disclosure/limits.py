"""Bounds on reading an export: every file there may be built to hang or exhaust the checker."""
from __future__ import annotations

import time
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_files: int = 10_000  # files in the export (the gateway's EXPORT_MAX_FILES)
    max_depth: int = 32  # folder depth of the export
    max_nesting: int = 4  # archive in archive in ...
    max_members: int = 10_000  # members of one archive
    max_file_bytes: int = 64 * GiB  # one export file (mapped, never read whole into memory)
    max_member_bytes: int = 2 * GiB  # one decompressed member or stream (held in memory)
    max_unpacked_bytes: int = 16 * GiB  # all decompressed bytes of one report
    max_image_pixels: int = 200_000_000  # Pillow decodes nothing larger
    max_table_cells: int = 5_000_000  # CSV/XLSX cells read
    max_text_bytes: int = 256 << 20  # text searched for identifiers in one file or member
    max_pickle_ops: int = 5_000_000  # opcodes of one pickle
    seconds: float = 3600.0  # the whole report


class LimitExceeded(Exception):
    """A bound was hit: what was being read is not fully checked (the file fails)."""


class Budget:
    """What a report has spent of its Limits: decompressed bytes and time."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.unpacked = 0
        self.deadline = time.monotonic() + limits.seconds

    def spend(self, nbytes: int) -> None:
        self.unpacked += nbytes
        if self.unpacked > self.limits.max_unpacked_bytes:
            raise LimitExceeded(f"more than {self.limits.max_unpacked_bytes} bytes decompressed in all")
        self.tick()

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"the report's {self.limits.seconds:.0f} s ran out")
