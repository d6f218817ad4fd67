"""The rules for a valid submission zip, and the words we refuse one with.

Used by the gateway and by the researcher's `m2d` client alike, so this module is
stdlib only and knows nothing about Flask, the database or the queue. It reads the
zip's central directory and requirements.txt; it never executes or imports anything
from the zip, and it never decompresses to find out how big something is.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import zipfile
from dataclasses import dataclass

REQUIRED_FILES = ("main.py", "requirements.txt")

# Finder's "Compress" adds AppleDouble metadata under __MACOSX/. It is never code, so
# it does not count as a second top folder when we look for main.py, and unpack()
# leaves it out; every safety rule still applies to it, because a hostile zip can
# put anything under that name.
MAC_JUNK_FOLDER = "__MACOSX"

# Compression methods zipfile can read; anything else (Deflate64 from Windows
# Explorer, AES from WinZip/7-Zip) would only fail later, in unpack().
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}

FLAG_ENCRYPTED = 0x01
FLAG_STRONG_ENCRYPTION = 0x40
FLAG_COMPRESSED_PATCH = 0x20


@dataclass(frozen=True)
class UploadLimits:
    max_zip_bytes: int = 200 * 1024**2
    max_files: int = 2000  # entries in the archive, folders included: each costs a mkdir
    max_uncompressed_bytes: int = 2 * 1024**3
    # uncompressed/compressed, for the whole archive and for each big entry
    max_ratio: float = 100.0
    max_requirements_bytes: int = 64 * 1024
    # Below this many uncompressed bytes the ratio does not matter: a small file of
    # zeros is harmless, and text of a few KB can legitimately compress very well.
    ratio_applies_above_bytes: int = 1024**2
    # The Pythons a .python-version may ask for (each has a base image), and the
    # one a zip without that file gets.
    pythons: tuple[str, ...] = ("3.9", "3.11", "3.13")
    default_python: str = "3.11"


class Refusal(Exception):
    """A submission we will not take. `code` is a stable slug for programs; `message`
    says what is wrong and how to fix it, for the researcher.

    Codes: not_a_zip, too_large, too_many_files, absolute_path, parent_path, symlink,
    encrypted, unsupported_compression, duplicate_path, too_big_uncompressed,
    compression_ratio, missing_main, missing_requirements, nested_folder,
    bad_requirements, bad_m2d_toml.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Checked:
    files: int  # regular files in the archive
    uncompressed_bytes: int
    requirements: str  # requirements.txt as text
    python: str = "3.11"  # major.minor, from .python-version or the default
    predict: str | None = None  # m2d.toml's [disclosure] predict, "module:function"


def check_upload_size(size: int, limits: UploadLimits = UploadLimits()) -> None:
    if size > limits.max_zip_bytes:
        raise Refusal(
            "too_large",
            f"Your zip is {_size(size)}; the limit is {_size(limits.max_zip_bytes)}. "
            "Leave data sets, model weights and virtual environments out of it: the "
            "dataset is mounted for you, and packages come from requirements.txt.",
        )


def check_zip(path, limits: UploadLimits = UploadLimits()) -> Checked:
    check_upload_size(os.path.getsize(path), limits)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:  # OSError: a seek past the start
        raise Refusal("not_a_zip", _not_a_zip_message(path)) from e
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.max_files:
            raise Refusal(
                "too_many_files",
                f"Your zip has {len(entries)} entries (files and folders); the limit is "
                f"{limits.max_files}. Leave out data, caches (__pycache__, .git) and "
                "virtual environments.",
            )
        for entry in entries:
            _check_entry(entry)
        files = _check_paths(entries)
        uncompressed = _check_sizes(entries, limits)
        _check_layout(files)
        requirements = _read_requirements(archive, limits)
        python = _read_python_version(archive, limits) if PYTHON_VERSION_FILE in files else limits.default_python
        predict = _read_m2d_toml(archive) if M2D_TOML in files else None
    _check_requirements(requirements)
    return Checked(files=len(files), uncompressed_bytes=uncompressed, requirements=requirements, python=python,
                   predict=predict)


def normalise_requirements(text: str) -> str:
    """The text with everything pip ignores taken out, so that two files that would
    install the same thing give the same image cache key."""
    lines = []
    for line in text.removeprefix("\ufeff").splitlines():
        line = _strip_comment(line).strip()
        if line:
            lines.append(line)
    return "".join(line + "\n" for line in lines)


def unpack(path, dest) -> None:
    """Extract a zip that passed check_zip into dest (empty or absent). On a Refusal
    dest may hold part of the zip; the caller removes it."""
    if os.path.exists(dest) and os.listdir(dest):
        raise FileExistsError(f"{dest} is not empty")
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    with zipfile.ZipFile(path) as archive:
        for entry in archive.infolist():
            # The zip on disk may not be the one that was checked; the checks that
            # keep us inside dest are cheap, so they run again here.
            _check_entry(entry)
            parts = _parts(entry.filename)
            if not parts or parts[0] == MAC_JUNK_FOLDER:
                continue
            target = os.path.join(root, *parts)
            if os.path.commonpath([root, os.path.realpath(target)]) != root:
                raise Refusal("parent_path", f"{entry.filename!r} would land outside the folder it is unpacked into.")
            if _is_folder(entry):
                os.makedirs(target, mode=0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            _write_regular_file(archive, entry, target)


def _write_regular_file(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, target: str) -> None:
    # Only the executable bit is taken from the zip; setuid, world-writable and the
    # like are not ours to grant. O_EXCL|O_NOFOLLOW: never write through anything that
    # is already there. zipfile stops at the declared size and checks the CRC, so a
    # central directory that lies about sizes cannot make us write more.
    mode = 0o755 if (entry.external_attr >> 16) & 0o111 else 0o644
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out, archive.open(entry) as source:
        os.fchmod(out.fileno(), mode)  # exact mode, whatever the umask
        while chunk := source.read(1024 * 1024):
            out.write(chunk)


# --- the archive -----------------------------------------------------------------


def _not_a_zip_message(path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "The uploaded file is empty (0 bytes). Upload a zip of your project with main.py and requirements.txt at its root."
    fix = "Make a zip instead: cd your-project && zip -r ../submission.zip ."
    if head.startswith(b"\x1f\x8b"):
        kind = "a gzip file (.gz or .tar.gz), not a zip"
    elif head[257:262] == b"ustar":
        kind = "a tar archive, not a zip"
    elif head.startswith((b"Rar!", b"7z\xbc\xaf")):
        kind = "a RAR or 7-Zip archive, not a zip"
    elif head.startswith(b"PK\x03\x04"):
        kind = "the start of a zip whose end is missing or damaged (the file was cut short?)"
        fix = "Zip your project again and re-upload the complete file."
    else:
        kind = "not a zip archive"
    return f"The uploaded file is {kind}. {fix}"


def _check_entry(entry: zipfile.ZipInfo) -> None:
    """The rules that concern one entry on its own."""
    name = entry.filename
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise Refusal(
            "absolute_path",
            f"Your zip contains {name!r}, an absolute path. Zip with paths relative to "
            "your project folder: cd your-project && zip -r ../submission.zip .",
        )
    if ".." in re.split(r"[/\\]", name):
        raise Refusal(
            "parent_path",
            f"Your zip contains {name!r}, whose path goes up with '..' and would land "
            "outside the submission folder. Zip from inside your project folder: "
            "cd your-project && zip -r ../submission.zip .",
        )
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise Refusal(
            "symlink",
            f"Your zip contains {name!r}, a symbolic link. Links are not unpacked; put "
            "the real file in the zip (zip without -y follows links) or leave it out.",
        )
    if entry.flag_bits & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION):
        raise Refusal(
            "encrypted",
            f"Your zip contains {name!r}, which is password-protected. The gateway "
            "cannot read encrypted files; zip your project again without a password.",
        )
    if entry.compress_type not in READABLE_METHODS or entry.flag_bits & FLAG_COMPRESSED_PATCH:
        raise Refusal(
            "unsupported_compression",
            f"Your zip stores {name!r} with a compression method the gateway cannot "
            f"read (method {entry.compress_type}). Re-create it with the standard "
            "'deflate' method, e.g. with the zip command or Python's zipfile.",
        )


def _parts(name: str) -> list[str]:
    # Some Windows tools write backslashes; they are separators to every unzip tool
    # a researcher might test with, so they are separators to us too.
    return [part for part in re.split(r"[/\\]", name) if part not in ("", ".")]


def _is_folder(entry: zipfile.ZipInfo) -> bool:
    return entry.filename.endswith(("/", "\\"))


def _check_paths(entries: list[zipfile.ZipInfo]) -> set[str]:
    """Refuse two entries that would unpack to the same place; return the regular
    files' paths, '/'-separated."""
    files: set[str] = set()
    folders: set[str] = set()
    for entry in entries:
        parts = _parts(entry.filename)
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if not parts:
            continue
        path = "/".join(parts)
        if _is_folder(entry):
            folders.add(path)
        elif path in files:
            raise Refusal("duplicate_path", f"Your zip contains {path!r} twice. Zip your project again so each file appears once.")
        else:
            files.add(path)
    clash = sorted(files & folders)
    if clash:
        raise Refusal(
            "duplicate_path",
            f"Your zip contains {clash[0]!r} both as a file and as a folder. Zip your project again from the folder itself.",
        )
    return files


def _check_sizes(entries: list[zipfile.ZipInfo], limits: UploadLimits) -> int:
    """Total uncompressed size, as the central directory declares it."""
    uncompressed = sum(entry.file_size for entry in entries)
    compressed = sum(entry.compress_size for entry in entries)
    if uncompressed > limits.max_uncompressed_bytes:
        raise Refusal(
            "too_big_uncompressed",
            f"Your zip unpacks to {_size(uncompressed)}; the limit is "
            f"{_size(limits.max_uncompressed_bytes)}. Leave data sets, model weights and "
            "virtual environments out: the dataset is mounted for you, and packages come "
            "from requirements.txt.",
        )
    # The whole-archive ratio catches many small bombs; the per-entry ratio catches one
    # bomb hidden among enough incompressible data to keep the average down.
    suspects = [("Your zip as a whole", uncompressed, compressed)]
    suspects += [(f"{entry.filename!r} in your zip", entry.file_size, entry.compress_size) for entry in entries]
    for what, size, packed in suspects:
        if size > limits.ratio_applies_above_bytes and size > limits.max_ratio * packed:
            ratio = size / packed if packed else float("inf")
            raise Refusal(
                "compression_ratio",
                f"{what} compresses {ratio:.0f}:1 ({_size(size)} from {_size(packed)}); the "
                f"limit is {limits.max_ratio:.0f}:1, because archives like that are "
                "usually zip bombs. Leave out large generated or padding files; create "
                "them in main.py if your job needs them.",
            )
    return uncompressed


def _check_layout(files: set[str]) -> None:
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not missing:
        return
    if not files:
        raise Refusal("missing_main", "Your zip is empty. Put main.py and requirements.txt at its root.")
    folder = _folder_holding(files, missing)
    if folder:
        what = " and ".join(missing)
        verb = "are" if len(missing) > 1 else "is"
        up = "../" * folder.count("/")
        raise Refusal(
            "nested_folder",
            f"{what} {verb} inside the folder '{folder}' in your zip; zip the files "
            f"themselves so they sit at the root: cd {folder.rstrip('/')} && zip -r {up}submission.zip .",
        )
    if "main.py" in missing:
        raise Refusal(
            "missing_main",
            "Your zip has no main.py at its root. The gateway runs `python main.py` from "
            "the root of your zip; put main.py there.",
        )
    raise Refusal(
        "missing_requirements",
        "Your zip has no requirements.txt at its root. Add one listing the packages "
        "main.py needs, one per line (it may be empty if it needs none).",
    )


def _folder_holding(files: set[str], names: list[str]) -> str | None:
    """The shallowest folder (ending in '/') that holds all of names, if any."""
    candidates = []
    for path in files:
        folder, _, base = path.rpartition("/")
        if folder and base == names[0] and not path.startswith(MAC_JUNK_FOLDER + "/"):
            if all(f"{folder}/{name}" in files for name in names):
                candidates.append(folder + "/")
    return min(candidates, key=lambda f: (f.count("/"), f), default=None)


def _size(size: int) -> str:
    if size >= 1024**2:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size / 1024:.1f} KiB" if size >= 1024 else f"{size} bytes"


# --- .python-version ------------------------------------------------------------

PYTHON_VERSION_FILE = ".python-version"
# pyenv's and uv's spellings of a CPython: 3.9, 3.9.18, python3.9, cpython-3.9, cpython@3.9
_PYTHON_VERSION = re.compile(r"(?:c?python[-@]?)?(3)\.(\d+)(?:\.\d+)?", re.IGNORECASE)


def parse_python_version(text: str, limits: UploadLimits = UploadLimits()) -> str:
    """The major.minor a .python-version asks for, if a base image has it.

    Its first line that is not blank or a comment counts (pyenv may list more;
    one image has one Python). A patch level is accepted and not honoured: the
    base image has the patch release its Debian ships.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    supported = ", ".join(limits.pythons)
    if not lines:
        raise Refusal("bad_python_version", f"{PYTHON_VERSION_FILE} is empty. Write one Python version "
                      f"in it, e.g. 3.11, or delete it to get the default ({limits.default_python}).")
    match = _PYTHON_VERSION.fullmatch(lines[0])
    if not match:
        raise Refusal("bad_python_version", f"{PYTHON_VERSION_FILE} says {lines[0][:40]!r}, which is not a "
                      f"CPython version. Write a version such as 3.11 (supported: {supported}).")
    version = f"{match.group(1)}.{int(match.group(2))}"
    if version not in limits.pythons:
        raise Refusal("unsupported_python", f"{PYTHON_VERSION_FILE} asks for Python {version}, which this "
                      f"gateway has no image for. Supported versions: {supported}. Write one of them in "
                      f"{PYTHON_VERSION_FILE}, or delete it to get {limits.default_python}.")
    return version


def _read_python_version(archive: zipfile.ZipFile, limits: UploadLimits) -> str:
    entry = next(e for e in archive.infolist() if "/".join(_parts(e.filename)) == PYTHON_VERSION_FILE)
    if entry.file_size > 1024:
        raise Refusal("bad_python_version", f"{PYTHON_VERSION_FILE} is {entry.file_size} bytes; it should "
                      "hold one version such as 3.11.")
    try:
        text = archive.read(entry).decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise Refusal("not_a_zip", f"Your zip is damaged: {PYTHON_VERSION_FILE} cannot be read from it. "
                      "Zip your project again.") from e
    return parse_python_version(text, limits)


# --- m2d.toml ------------------------------------------------------------------
# [disclosure]
# predict = "main:predict"
# The prediction entry point the disclosure report's membership inference calls:
# predict(export_dir, images) -> probabilities of malignant (docs/researchers.md).

M2D_TOML = "m2d.toml"
MAX_M2D_TOML_BYTES = 16 * 1024
_M2D_TOML_HOW = ('Write it as:\n[disclosure]\npredict = "main:predict"\n(a module at your zip\'s root, then a '
                 "colon, then the function's name), or delete m2d.toml.")
_ENTRY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def parse_m2d_toml(text: str) -> str | None:
    """m2d.toml's prediction entry point ("module:function"), or None when it
    declares none. A Refusal names the key that is wrong."""
    how = _M2D_TOML_HOW
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Refusal("bad_m2d_toml", f"{M2D_TOML} is not valid TOML ({e}). {how}") from None
    unknown = sorted(set(data) - {"disclosure"})
    if unknown:
        raise Refusal("bad_m2d_toml", f"{M2D_TOML} has the unknown table or key {unknown[0]!r}. {how}")
    section = data.get("disclosure")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise Refusal("bad_m2d_toml", f"{M2D_TOML}: 'disclosure' must be a table. {how}")
    unknown = sorted(set(section) - {"predict"})
    if unknown:
        raise Refusal("bad_m2d_toml", f"{M2D_TOML}: [disclosure] has the unknown key {unknown[0]!r}. {how}")
    entry = section.get("predict")
    if entry is None:
        return None
    if not isinstance(entry, str) or not _ENTRY.fullmatch(entry):
        raise Refusal("bad_m2d_toml", f"{M2D_TOML}: [disclosure] predict is {str(entry)[:60]!r}, not "
                      f"'module:function'. {how}")
    return entry


def _read_m2d_toml(archive: zipfile.ZipFile) -> str | None:
    entry = next(e for e in archive.infolist() if "/".join(_parts(e.filename)) == M2D_TOML)
    if entry.file_size > MAX_M2D_TOML_BYTES:
        raise Refusal("bad_m2d_toml", f"{M2D_TOML} is {entry.file_size} bytes; the limit is {MAX_M2D_TOML_BYTES}. "
                      f"{_M2D_TOML_HOW}")
    try:
        raw = archive.read(entry)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise Refusal("not_a_zip", f"Your zip is damaged: {M2D_TOML} cannot be read from it. "
                      "Zip your project again.") from e
    try:
        return parse_m2d_toml(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refusal("bad_m2d_toml", f"{M2D_TOML} is not UTF-8 text. {_M2D_TOML_HOW}") from None


# --- requirements.txt ------------------------------------------------------------


def _read_requirements(archive: zipfile.ZipFile, limits: UploadLimits) -> str:
    entry = next(e for e in archive.infolist() if "/".join(_parts(e.filename)) == "requirements.txt")
    if entry.file_size > limits.max_requirements_bytes:
        raise Refusal(
            "bad_requirements",
            f"requirements.txt is {entry.file_size} bytes; the limit is "
            f"{limits.max_requirements_bytes}. It should list package names and versions, "
            "one per line.",
        )
    try:
        data = archive.read(entry)
    except Exception as e:  # a corrupt stream fails in zipfile, zlib, bz2 or lzma, each its own way
        raise Refusal("not_a_zip", "Your zip is damaged: requirements.txt cannot be read from it. Zip your project again.") from e
    if b"\0" in data:
        raise Refusal("bad_requirements", "requirements.txt is not a text file. It should list package names and versions, one per line.")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise Refusal(
            "bad_requirements",
            f"requirements.txt is not UTF-8 text (byte {e.start} cannot be read). Save it "
            "as UTF-8 in your editor and zip again.",
        ) from e


# Each refused pip option, with why. The image is built from requirements.txt alone,
# from PyPI; anything that points pip somewhere else reaches outside the build.
_NOT_BUILT_FROM_HERE = (
    "the image is built from requirements.txt alone, so the files and folders next to "
    "it are not there, and a path would point at the build host's disk instead"
)
_REFUSED_OPTIONS = {
    ("-e", "--editable"): (
        "editable installs keep a local source tree or checkout linked into the "
        "environment; " + _NOT_BUILT_FROM_HERE + ". Name the package (name==version), "
        "put its code next to main.py, or ask the gateway's admins to allow the host a "
        "direct URL (name @ https://...) points at: builds reach only the package index."
    ),
    ("-r", "--requirement", "-c", "--constraint"): (
        "it includes another file, and " + _NOT_BUILT_FROM_HERE + ". Copy the lines of "
        "that file into requirements.txt."
    ),
    ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host"): (
        "packages are installed from PyPI only; other indexes and link pages are "
        "outside what the build may reach (and an extra index invites dependency "
        "confusion). Remove the line, or ask the gateway admins about a private index."
    ),
}
_LOCAL_PATH = (
    "it names a local path, and " + _NOT_BUILT_FROM_HERE + ". Publish the package and "
    "name it, put its code next to main.py, or ask the gateway's admins to allow the "
    "host a direct URL (name @ https://...) points at: builds reach only the package index."
)
_ENV_VARIABLE = (
    "pip would fill ${...} in from the build host's environment, which is not yours "
    "to read. Write the value out."
)
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2")


def _check_requirements(text: str) -> None:
    problems = []
    for number, line in _logical_lines(text):
        reason = _why_refused(line)
        if reason:
            problems.append(f"line {number}, '{line}': {reason}")
    if problems:
        raise Refusal("bad_requirements", "requirements.txt cannot be used.\n" + "\n".join(problems))


def _logical_lines(text: str):
    """(first line number, line) as pip sees them: continuations joined, comments out."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line = _strip_comment(pending + line).strip()
        pending = ""
        if line:
            yield start, line
    line = _strip_comment(pending).strip()
    if line:
        yield start, line


def _strip_comment(line: str) -> str:
    # pip's rule: '#' starts a comment at the start of a line or after whitespace, so
    # the '#egg=' in a URL survives.
    return re.sub(r"(^|\s)#.*$", "", line)


def _why_refused(line: str) -> str | None:
    if "${" in line:
        return _ENV_VARIABLE
    for token in line.split():
        if token.startswith("-"):
            reason = _why_option_refused(token)
        else:
            reason = _LOCAL_PATH if _is_local_path(token) else None
        if reason:
            return reason
    return None


def _why_option_refused(token: str) -> str | None:
    # --index-url=URL is --index-url URL; -rother.txt is -r other.txt
    option = token.split("=", 1)[0] if token.startswith("--") else token[:2]
    for names, reason in _REFUSED_OPTIONS.items():
        if any(_same_option(option, name) for name in names):
            return reason
    return None


def _same_option(written: str, name: str) -> bool:
    if written.startswith("--"):
        # pip takes any unambiguous prefix of a long option (--extra-index for
        # --extra-index-url), so a prefix is as good as the whole name.
        return len(written) > 2 and name.startswith(written)
    return written == name


def _is_local_path(token: str) -> bool:
    token = token.strip("'\"")
    lower = token.lower()
    # file: as the URL's scheme, also after a name (six@file:///x.whl) or a VCS (git+file://)
    if re.search(r"(^|[@+])file:", lower) or token.startswith((".", "/", "~", "\\")) or re.match(r"[A-Za-z]:[/\\]", token):
        return True
    if "://" in token:
        return False  # a URL: https://, git+https://, ...
    return "/" in token or "\\" in token or lower.endswith(_ARCHIVE_SUFFIXES)
