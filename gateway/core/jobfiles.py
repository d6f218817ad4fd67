"""The one reader of what jobs wrote: a submission's export/, export-dryrun/ and logs/.

Everything in those folders was written by the researcher's code (or by Slurm
for it), so every name and every file type there is hostile: a folder swapped
for a symlink to the dataset or to /proc/self while the gateway looks, a FIFO
that hangs a read, names that are not UTF-8, a million files. Nothing else in
the gateway opens, lists, stats or hashes such a path (tests/test_jobfiles.py
checks the source); callers name a submission, a folder and a relative name.

- No symlink is followed at any depth: openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where the kernel has it, else a
  walk of O_DIRECTORY | O_NOFOLLOW directory fds, one name at a time.
- Files are opened O_NOFOLLOW | O_NONBLOCK and fstat-ed: anything but a
  regular file with one link is refused (a FIFO would hang, a device would
  answer); reads are bounded.
- Names are bytes; they are shown escaped (``escape``), never decoded lossily:
  two different names never show the same.
- A walk is bounded in files, depth, bytes and seconds (EXPORT_MAX_FILES,
  EXPORT_MAX_DEPTH, EXPORT_MAX_BYTES, EXPORT_READ_SECONDS); past a bound it
  raises ``Refused`` with a reason for that one submission, never for the
  poll cycle or the purge.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from flask import current_app

EXPORT, DRY_RUN_EXPORT, LOGS = "export", "export-dryrun", "logs"
FOLDERS = (EXPORT, DRY_RUN_EXPORT, LOGS)
CHUNK = 1024 * 1024

# openat2(2): linux/openat2.h
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works = SYS_OPENAT2 is not None  # cleared on the first ENOSYS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Refused(Exception):
    """What a job wrote cannot be read within the bounds, or is not what it
    claims (a symlink, a FIFO...): ``reason`` says which, for the researcher."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Bounds:
    files: int
    depth: int
    bytes: int
    seconds: float

    @classmethod
    def from_config(cls, cfg) -> Bounds:
        return cls(cfg["EXPORT_MAX_FILES"], cfg["EXPORT_MAX_DEPTH"], cfg["EXPORT_MAX_BYTES"],
                   cfg["EXPORT_READ_SECONDS"])


@dataclass
class File:
    name: bytes  # relative, b"/"-separated, exactly as on disk
    size: int
    sha256: str | None = None  # None: the gateway may not read it (the job's permissions)
    text: str | None = None  # the preview of a small UTF-8 text file, when asked for

    @property
    def path(self) -> str:
        return escape(self.name)


@dataclass
class Listing:
    files: list[File] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (escaped name, why): never read

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# ------------------------------------------------------------------ names

def escape(name: bytes) -> str:
    """``name`` as text that shows every byte and is never the text of another
    name: UTF-8 stays as it is; a backslash becomes two; a byte that is not
    UTF-8, or an ASCII control character, becomes ``\\xNN``; other characters
    that hide or reorder text (C1 controls, line separators, bidi overrides)
    become ``\\uNNNN``. ``unescape`` gives the bytes back."""
    out = []
    for char in name.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0x80 <= code < 0xA0 or code in _HIDING:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


_HIDING = {0x2028, 0x2029, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF}


def unescape(text: str) -> bytes:
    """The bytes ``escape`` showed as ``text``; ValueError for text it never makes."""
    out, i = bytearray(), 0
    while i < len(text):
        char, kind = text[i], text[i + 1:i + 2]
        if char != "\\":
            out += char.encode("utf-8")
            i += 1
        elif kind == "\\":
            out += b"\\"
            i += 2
        elif kind == "x" and re.fullmatch(r"[0-9a-f]{2}", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif kind == "u" and re.fullmatch(r"[0-9a-f]{4}", text[i + 2:i + 6]):
            out += chr(int(text[i + 2:i + 6], 16)).encode("utf-8")
            i += 6
        else:
            raise ValueError(f"{text!r} is not a name as escape() writes it")
    return bytes(out)


def text_of(data: bytes) -> str:
    """What a job wrote (a log, a preview) as text a database keeps: bytes that
    are not UTF-8 become U+FFFD, and so does NUL (PostgreSQL refuses it in text)."""
    return data.decode("utf-8", "replace").replace("\x00", "\ufffd")


# ------------------------------------------------------------------ opening

def _root_fd(submission_id: int) -> int:
    """The submission's own folder (the gateway's; the job account may not
    change it), opened as a directory."""
    root = Path(current_app.config["DATA_DIR"]) / "submissions" / str(int(submission_id))
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _components(name: bytes) -> list[bytes]:
    parts = name.split(b"/")
    if not name or any(p in (b"", b".", b"..") for p in parts):
        raise Refused(f"'{escape(name)}' is not a plain relative name")
    return parts


def open_beneath(dir_fd: int, name: bytes, flags: int) -> int:
    """``name`` under ``dir_fd``, following no symlink at any depth; OSError
    (ELOOP, ENOTDIR, EXDEV...) when a component is one."""
    global _openat2_works
    _components(name)
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _openat2_works:
        how = _OpenHow(flags=flags, mode=0, resolve=RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(name), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that does not know it
            raise OSError(err, os.strerror(err), escape(name))
        _openat2_works = False
    return _open_walking(dir_fd, name, flags)


def _open_walking(dir_fd: int, name: bytes, flags: int) -> int:
    """openat2's promise without it: one component at a time, each directory
    opened O_NOFOLLOW (a symlink there fails with ELOOP)."""
    parts = _components(name)
    current = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            following = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = following
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
    finally:
        os.close(current)


def _folder_fd(submission_id: int, folder: str) -> int:
    if folder not in FOLDERS:
        raise ValueError(f"jobfiles reads only {FOLDERS}, not {folder!r}")
    root = _root_fd(submission_id)
    try:
        return open_beneath(root, folder.encode(), os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(root)


def _open_regular(dir_fd: int, name: bytes) -> tuple[int, os.stat_result]:
    """A regular file with one link, opened for reading; Refused otherwise."""
    fd = open_beneath(dir_fd, name, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise Refused(f"'{escape(name)}' is {_kind(info)}, not a file: never read")
    return fd, info


def _kind(info: os.stat_result) -> str:
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return f"a file with {info.st_nlink} hard links"
    return {stat.S_IFLNK: "a symlink", stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}.get(stat.S_IFMT(mode), "not a file")


# ------------------------------------------------------------------ reading one file

def read_tail(submission_id: int, folder: str, name: str, limit: int) -> tuple[bytes, int] | None:
    """The last ``limit`` bytes of one file and its whole size; None when it is
    missing, unreadable or not a regular file."""
    try:
        fd, info = _open_one(submission_id, folder, name)
    except (OSError, Refused):
        return None
    with os.fdopen(fd, "rb") as f:
        f.seek(max(0, info.st_size - limit))
        return f.read(limit), info.st_size


def read_head(submission_id: int, folder: str, name: bytes | str, limit: int) -> bytes | None:
    """The first ``limit`` bytes of one file; None as read_tail."""
    try:
        fd, _ = _open_one(submission_id, folder, name)
    except (OSError, Refused):
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def copy_out(submission_id: int, folder: str, name: bytes, target: Path, limit: int) -> str:
    """Copy one file to ``target`` (made 0600, the gateway's alone), at most
    ``limit`` bytes; its sha256. OSError or Refused when it cannot be read."""
    fd, _ = _open_one(submission_id, folder, name)
    digest = hashlib.sha256()
    copied = 0
    with os.fdopen(fd, "rb") as src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                                                  0o600), "wb") as out:
        while chunk := src.read(CHUNK):
            copied += len(chunk)
            if copied > limit:
                raise Refused(f"'{escape(name)}' grew past {limit} bytes")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _open_one(submission_id: int, folder: str, name: bytes | str) -> tuple[int, os.stat_result]:
    raw = name if isinstance(name, bytes) else name.encode()
    folder_fd = _folder_fd(submission_id, folder)
    try:
        return _open_regular(folder_fd, raw)
    finally:
        os.close(folder_fd)


# ------------------------------------------------------------------ walking

def scan(submission_id: int, folder: str, bounds: Bounds, *, hashes: bool = True,
         previews: int = 0, preview_total: int = 0) -> Listing:
    """Every regular file under ``folder`` (sizes; sha256 with ``hashes``; the
    text of UTF-8 files up to ``previews`` bytes, ``preview_total`` in all),
    and what was skipped and why. Refused past a bound. A missing folder is empty."""
    deadline = time.monotonic() + bounds.seconds
    listing, read, shown, entries = Listing(), 0, 0, 0
    try:
        top = _folder_fd(submission_id, folder)
    except FileNotFoundError:
        return listing
    except OSError as e:
        raise Refused(f"{folder}/ cannot be opened ({e.strerror})") from None
    stack: list[tuple[int, bytes, int]] = [(top, b"", 1)]
    try:
        while stack:
            dir_fd, prefix, depth = stack.pop()
            try:
                for name in _names(dir_fd, bounds.files):
                    if time.monotonic() > deadline:
                        raise Refused(f"{folder}/ took longer than {bounds.seconds:g} s to read "
                                      "(M2D_EXPORT_READ_SECONDS); write fewer, larger files")
                    entries += 1
                    if entries > bounds.files:
                        raise Refused(f"{folder}/ holds more than {bounds.files} files and folders "
                                      "(M2D_EXPORT_MAX_FILES); write fewer, larger files (a zip or tar of them)")
                    rel = prefix + name
                    try:
                        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError as e:  # gone since it was listed
                        listing.skipped.append((escape(rel), f"not read: {e.strerror}"))
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        if depth >= bounds.depth:
                            raise Refused(f"{folder}/ has folders more than {bounds.depth} deep "
                                          f"('{escape(rel)}'; M2D_EXPORT_MAX_DEPTH)")
                        try:
                            child = open_beneath(dir_fd, name, os.O_RDONLY | os.O_DIRECTORY)
                        except OSError as e:  # swapped for a symlink since the stat, or made unreadable
                            listing.skipped.append((escape(rel), f"folder not opened: {e.strerror}"))
                            continue
                        stack.append((child, rel + b"/", depth + 1))
                        continue
                    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                        listing.skipped.append((escape(rel), f"{_kind(info)}: never read"))
                        continue
                    file = File(rel, info.st_size)
                    read += info.st_size
                    if read > bounds.bytes:
                        raise Refused(f"{folder}/ holds more than {bounds.bytes} bytes (M2D_EXPORT_MAX_BYTES); "
                                      "export only what you need released (a model, metrics), never data")
                    if hashes or (previews and info.st_size <= previews):
                        try:
                            file.sha256, file.text, file.size = _read_file(
                                dir_fd, name, preview=previews if shown + info.st_size <= preview_total else 0,
                                deadline=deadline)
                        except Refused as e:
                            listing.skipped.append((escape(rel), e.reason))
                            continue
                        except OSError as e:
                            if e.errno not in (errno.EACCES, errno.EPERM):
                                listing.skipped.append((escape(rel), f"not read: {e.strerror}"))
                                continue
                        shown += len(file.text or "")
                    listing.files.append(file)
            finally:
                os.close(dir_fd)
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)
    listing.files.sort(key=lambda f: f.name)
    return listing


def _names(dir_fd: int, most: int) -> list[bytes]:
    """The names in one folder, sorted, as bytes; at most ``most`` + 1 of them
    are read (a folder with a million is refused after that many)."""
    names = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            names.append(os.fsencode(entry.name))
            if len(names) > most:
                break
    return sorted(names)


def _read_file(dir_fd: int, name: bytes, preview: int, deadline: float) -> tuple[str, str | None, int]:
    """sha256, preview text (or None) and size of one regular file, read once."""
    fd, info = _open_regular(dir_fd, name)
    digest, head = hashlib.sha256(), b""
    size = 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            if not head and preview:
                head = chunk[:preview + 1]
            size += len(chunk)
            if size > info.st_size:
                raise Refused(f"'{escape(name)}' grew while it was read")
            if time.monotonic() > deadline:
                raise Refused(f"'{escape(name)}' took too long to read")
            digest.update(chunk)
    text = None
    if preview and size <= preview:
        try:
            text = head.decode("utf-8").replace("\x00", "\ufffd")
        except UnicodeDecodeError:
            pass
    return digest.hexdigest(), text, size


# ------------------------------------------------------------------ deleting

def remove_all(submission_id: int, folder: str) -> list[str]:
    """Delete everything in ``folder`` (not the folder), following no symlink;
    the escaped names that could not be deleted, with why."""
    failed = []
    try:
        folder_fd = _folder_fd(submission_id, folder)
    except FileNotFoundError:
        return failed
    try:
        with os.scandir(folder_fd) as entries:
            names = [os.fsencode(e.name) for e in entries]
        for name in names:
            try:
                info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(name, dir_fd=folder_fd)  # fd-based on Linux: follows no symlink
                else:
                    os.unlink(name, dir_fd=folder_fd)
            except OSError as e:  # a folder the job made unwritable to the group
                failed.append(f"{escape(name)}: {e.strerror}")
    finally:
        os.close(folder_fd)
    return failed
