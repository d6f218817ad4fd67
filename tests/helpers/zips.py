"""Submission zips, good and bad, for any test that needs one.

Each make_* function writes a zip to `path` and returns the path. The bad ones are
named after what is wrong with them; a few are hand-edited after zipfile wrote them,
because zipfile will not write them itself (encrypted flag, a size that lies, an
unknown compression method).
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import warnings
import zipfile
from pathlib import Path

MAIN_PY = b"import mlflow\nprint('hello from main.py')\n"
REQUIREMENTS = b"# what main.py needs\nnumpy==2.3.4\nmlflow-skinny\n"
VALID_FILES = {"main.py": MAIN_PY, "requirements.txt": REQUIREMENTS}


def make_zip(path, files: dict[str, bytes | str] = VALID_FILES, *, modes: dict[str, int] | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip holding `files` (name -> content; a name ending in '/' is a folder).
    `modes` sets Unix permission bits for some names (e.g. {"run.sh": 0o755})."""
    modes = modes or {}
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            kind = stat.S_IFDIR if name.endswith("/") else stat.S_IFREG
            info.external_attr = (kind | modes.get(name, 0o755 if kind == stat.S_IFDIR else 0o644)) << 16
            archive.writestr(info, content)
    return Path(path)


def make_valid_zip(path) -> Path:
    return make_zip(path)


def make_zip_with_folders(path) -> Path:
    return make_zip(path, {
        **VALID_FILES,
        "README.md": b"# My model\n",
        "src/": b"",
        "src/model.py": b"def predict(x):\n    return x\n",
        "src/utils/helpers.py": b"",
        "config/settings.json": b"{}",
        "run.sh": b"#!/bin/sh\npython main.py\n",
    }, modes={"run.sh": 0o755})


def make_macos_zip(path) -> Path:
    """What macOS Finder's "Compress" makes of selected files: AppleDouble junk under
    __MACOSX/ next to the real files."""
    return make_zip(path, {
        **VALID_FILES,
        "__MACOSX/": b"",
        "__MACOSX/._main.py": b"\x00\x05\x16\x07junk",
        "__MACOSX/._requirements.txt": b"\x00\x05\x16\x07junk",
    })


def make_nested_zip(path, folder: str = "project") -> Path:
    """Finder or `zip -r x.zip project` on the folder: everything one level down, with
    __MACOSX junk beside it so that there are two top folders."""
    return make_zip(path, {
        f"{folder}/": b"",
        **{f"{folder}/{name}": content for name, content in VALID_FILES.items()},
        f"__MACOSX/{folder}/._main.py": b"\x00\x05\x16\x07junk",
    })


def make_zip_without(path, name: str) -> Path:
    return make_zip(path, {n: c for n, c in VALID_FILES.items() if n != name} | {"model.py": b""})


def make_empty_zip(path) -> Path:
    return make_zip(path, {})


def make_text_file(path) -> Path:
    Path(path).write_bytes(b"this is not a zip\n")
    return Path(path)


def make_empty_file(path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def make_tar_renamed_zip(path) -> Path:
    """A .tar.gz someone renamed to .zip."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in VALID_FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    Path(path).write_bytes(buffer.getvalue())
    return Path(path)


def make_truncated_zip(path) -> Path:
    """A good zip cut short, as by an interrupted upload: the central directory is gone."""
    make_zip(path, {**VALID_FILES, "data.bin": bytes(range(256)) * 64})
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def make_padded_zip(path, size: int) -> Path:
    """A valid zip of about `size` bytes (stored, so it does not shrink)."""
    return _zip_with_zeros(path, "weights.bin", size, zipfile.ZIP_STORED)


def make_many_files_zip(path, count: int = 2001) -> Path:
    return make_zip(path, VALID_FILES | {f"data/{i:05}.txt": b"" for i in range(count)})


def make_absolute_path_zip(path, name: str = "/etc/cron.d/m2d") -> Path:
    return make_zip(path, VALID_FILES | {name: b"* * * * * root sh -c 'id'\n"})


def make_parent_path_zip(path, name: str = "../../outside.py") -> Path:
    return make_zip(path, VALID_FILES | {name: b"print('escaped')\n"})


def make_symlink_zip(path, name: str = "dataset", target: str = "/etc/passwd") -> Path:
    """What `zip -y` makes of a symbolic link: its target as content, S_IFLNK as mode."""
    with zipfile.ZipFile(path, "w") as archive:
        for n, content in VALID_FILES.items():
            archive.writestr(n, content)
        info = zipfile.ZipInfo(name)
        info.create_system = 3  # Unix, where the mode bits mean what they say
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, target)
    return Path(path)


def make_encrypted_zip(path, name: str = "main.py") -> Path:
    """`name` flagged as encrypted (general-purpose bit 0). zipfile cannot encrypt,
    so the flag is set by hand in both headers; the data stays readable, but any zip
    reader now asks for a password."""
    make_zip(path)
    _patch_entry(path, name, flag_bits=0x1)
    return Path(path)


def make_unsupported_compression_zip(path, name: str = "main.py", method: int = 9) -> Path:
    """`name` marked as compressed with `method` (9 = Deflate64, as Windows Explorer
    writes big files), which zipfile cannot read."""
    make_zip(path)
    _patch_entry(path, name, method=method)
    return Path(path)


def make_duplicate_zip(path, name: str = "main.py") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate; that's the point
        with zipfile.ZipFile(path, "w") as archive:
            for n, content in VALID_FILES.items():
                archive.writestr(n, content)
            archive.writestr(name, b"print('the other one')\n")
    return Path(path)


def make_zip_bomb(path, size: int = 16 * 1024**2) -> Path:
    """A valid submission plus `size` bytes of zeros that deflate about 1000:1."""
    return _zip_with_zeros(path, "bomb.bin", size, zipfile.ZIP_DEFLATED)


def _zip_with_zeros(path, name: str, size: int, compression: int) -> Path:
    """A valid submission plus a file `name` of `size` zero bytes, written in chunks."""
    with zipfile.ZipFile(path, "w", compression, compresslevel=9) as archive:
        for file_name, content in VALID_FILES.items():
            archive.writestr(file_name, content)
        with archive.open(name, "w", force_zip64=True) as out:
            chunk = bytes(1024**2)
            for _ in range(size // len(chunk)):
                out.write(chunk)
            out.write(bytes(size % len(chunk)))
    return Path(path)


def make_huge_declared_zip(path, declared: int = 3 * 1024**3) -> Path:
    """A small zip whose central directory says one entry unpacks to `declared` bytes
    (under 4 GiB, so no zip64 record is needed)."""
    make_zip(path, VALID_FILES | {"weights.bin": b"\0" * 1024})
    _patch_entry(path, "weights.bin", declared_size=declared)
    return Path(path)


def make_requirements_zip(path, requirements: bytes | str) -> Path:
    return make_zip(path, {"main.py": MAIN_PY, "requirements.txt": requirements})


# Offsets into the zip format's headers (APPNOTE.TXT 4.3.7 and 4.3.12).
_LOCAL_FLAGS, _LOCAL_METHOD, _LOCAL_SIZE = 6, 8, 22
_CENTRAL_FLAGS, _CENTRAL_METHOD, _CENTRAL_SIZE, _CENTRAL_NAME_LENGTHS, _CENTRAL_FIXED = 8, 10, 24, 28, 46


def _patch_entry(path, name: str, *, flag_bits: int = 0, method: int | None = None,
                 declared_size: int | None = None) -> None:
    """Edit one entry's local header and central directory record in place."""
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
        central = archive.start_dir
        count = len(archive.infolist())
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(central)
            header = f.read(_CENTRAL_FIXED)
            name_length, extra_length, comment_length = struct.unpack_from("<3H", header, _CENTRAL_NAME_LENGTHS)
            if f.read(name_length) == name.encode():
                _patch_header(f, central, _CENTRAL_FLAGS, _CENTRAL_METHOD, _CENTRAL_SIZE, flag_bits, method, declared_size)
            central += _CENTRAL_FIXED + name_length + extra_length + comment_length
        _patch_header(f, local, _LOCAL_FLAGS, _LOCAL_METHOD, _LOCAL_SIZE, flag_bits, method, declared_size)


def _patch_header(f, start, flags_at, method_at, size_at, flag_bits, method, declared_size) -> None:
    f.seek(start + flags_at)
    (flags,) = struct.unpack("<H", f.read(2))
    f.seek(start + flags_at)
    f.write(struct.pack("<H", flags | flag_bits))
    if method is not None:
        f.seek(start + method_at)
        f.write(struct.pack("<H", method))
    if declared_size is not None:
        f.seek(start + size_at)
        f.write(struct.pack("<I", declared_size))
