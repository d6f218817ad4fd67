"""The export as it would be released, for the submission's predict: the rounded model's held-out metric.

    python -m m2d.disclosure rounded-view --export /mnt/export --view VIEW --link-to /mnt/original \
        --sanitise-bits 7 --manifest VIEW.json

A model file leaves as its sanitised copy (sanitise.py: safetensors, floats
rounded), which the researcher's ``predict(export_dir, images)`` cannot load: it
loads ``model.tar`` with torch.load. So the report job asks predict a second
time (singularity/disclosure.sbatch.j2), on a view of the export where each
model file is that file rounded in its own format (sanitise.write_rounded: the
copy's numbers, the original's pickle and layout, the same name) and every
other file is a symlink to the original (under ``--link-to``, where the
predict step mounts the export read-only); folders are real folders, so a
predict that walks the export finds what it found there. The membership step
then compares the two runs' held-out metrics (membership.compare).

An archive that holds such a model (archives.py: zip, tar, a compressed
stream of one) is written again with each model member rounded in its own
format and every other member copied, as its sanitised copy is made.

Trusted (the checker's image, the export read-only): it decides which files are
rounded by their content, as the report does (sanitise.MODEL_TYPES, and
archives.ARCHIVE_TYPES holding one), and writes
the manifest the report step matches against its own entries: each rounded
file's path (escaped as the report names it) with the sha256 of the bytes it
was rounded from, and why any model file could not be rounded (it is then
linked as written: it would leave as written too).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import stat
from pathlib import Path

from m2d.contract.names import escape

from . import archives, sanitise, sniff
from .limits import Limits

VERSION = 1
EXIT_NOTHING_ROUNDED = 4  # no model file to round: predict need not run again


def make_view(export: str | os.PathLike, view: str | os.PathLike, link_to: str, mantissa_bits: int,
              limits: Limits = Limits()) -> dict:
    """Fill the empty folder ``view``; the manifest: {version, mantissa_bits,
    rounded: {path: sha256 of the source}, as_written: {path: why}}."""
    manifest: dict = {"version": VERSION, "mantissa_bits": mantissa_bits, "rounded": {}, "as_written": {}}
    seen = [0]
    root = os.open(export, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _fill(root, b"", Path(view), link_to.rstrip("/"), mantissa_bits, limits, manifest, seen)
    finally:
        os.close(root)
    return manifest


def _fill(dir_fd: int, prefix: bytes, view: Path, link_to: str, bits: int, limits: Limits, manifest: dict,
          seen: list[int]) -> None:
    if prefix.count(b"/") > limits.max_depth:
        return  # the report fails what lies this deep
    with os.scandir(dir_fd) as entries:
        names = sorted(os.fsencode(e.name) for e in entries)
    for name in names:
        seen[0] += 1
        if seen[0] > limits.max_files:
            return  # likewise
        rel = prefix + name
        here = view / os.fsdecode(rel)
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                here.mkdir()
                _fill(fd, rel + b"/", view, link_to, bits, limits, manifest, seen)
            finally:
                os.close(fd)
        elif stat.S_ISREG(info.st_mode):
            if not _round(dir_fd, name, escape(rel), here, bits, manifest, limits):
                here.symlink_to(f"{link_to}/{os.fsdecode(rel)}")
        # a symlink, FIFO, device or socket is left out: the report fails it, and predict met it as written


def _round(dir_fd: int, name: bytes, path: str, target: Path, bits: int, manifest: dict,
           limits: Limits = Limits()) -> bool:
    """Write the file rounded at ``target`` when it is a model file that can be,
    or an archive holding one; whether it was."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        size = os.fstat(fd).st_size
        if not size:
            return False
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
            kind = sniff.kind(data)
            if kind not in sanitise.MODEL_TYPES and kind not in archives.ARCHIVE_TYPES:
                return False
            digest = hashlib.sha256(data).hexdigest()
            try:
                if kind in archives.ARCHIVE_TYPES:
                    if not archives.write_rounded_archive(data, target, bits, limits):
                        return False  # no model inside: linked as written
                else:  # through the fd: no path is followed twice
                    sanitise.write_rounded(Path(f"/proc/self/fd/{fd}"), target, bits)
            except sanitise.Unsanitisable as e:
                manifest["as_written"][path] = e.reason
                return False
            except Exception as e:  # noqa: BLE001 - a hostile file must not stop the view (as in the report)
                manifest["as_written"][path] = f"the rounding failed on it ({type(e).__name__})"
                target.unlink(missing_ok=True)
                return False
        manifest["rounded"][path] = digest
        return True
    finally:
        os.close(fd)
