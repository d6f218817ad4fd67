"""The researcher's client, m2d, as the wheel this gateway serves.

Built from this clone's pyproject.toml (its [project] table and the packages
and package data [tool.setuptools] names: what `pip install .` installs), in
memory, once per process, byte for byte the same each time (fixed dates,
sorted names), so every gunicorn worker serves one file. No build tool and no
network: a pure-Python wheel is a zip with three metadata files and a RECORD.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from m2d.contract import __version__

REPO = Path(__file__).resolve().parent.parent
_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest: reproducible bytes


@dataclass(frozen=True)
class Wheel:
    name: str  # m2d-<version>-py3-none-any.whl
    data: bytes
    sha256: str


def file_name(version: str = __version__) -> str:
    return f"m2d-{version}-py3-none-any.whl"


def _files(tool: dict) -> dict[str, bytes]:
    """Archive name -> bytes for each module and data file (links followed: base.def, relay.py)."""
    files = {}
    for package in tool["packages"]:
        folder = REPO / package.replace(".", "/")
        paths = set(folder.glob("*.py"))
        for pattern in tool.get("package-data", {}).get(package, []):
            paths.update(folder.glob(pattern))
        for path in paths:
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(REPO).as_posix()] = path.read_bytes()
    return files


def _metadata(project: dict, version: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {version}",
             f"Summary: {project['description']}", f"Requires-Python: {project['requires-python']}"]
    lines += [f"Requires-Dist: {requirement}" for requirement in project.get("dependencies", [])]
    for extra, requirements in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {requirement}; extra == "{extra}"' for requirement in requirements]
    return "\n".join(lines) + "\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def extra_requirements(extra: str) -> list[str]:
    """The requirements of one of m2d's extras (``pip install 'm2d[EXTRA]'``), from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project.get("optional-dependencies", {}).get(extra, []))


@functools.cache
def build() -> Wheel:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, tool = table["project"], table["tool"]["setuptools"]
    info = f"m2d-{__version__}.dist-info"
    files = _files(tool)
    files[f"{info}/METADATA"] = _metadata(project, __version__).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: gateway.client_wheel\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    scripts = "".join(f"{name} = {target}\n" for name, target in project.get("scripts", {}).items())
    files[f"{info}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    record = "\n".join([_record_line(name, data) for name, data in sorted(files.items())] + [f"{info}/RECORD,,"]) + "\n"
    files[f"{info}/RECORD"] = record.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            entry = zipfile.ZipInfo(name, _DATE)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, files[name])
    data = buffer.getvalue()
    return Wheel(file_name(), data, hashlib.sha256(data).hexdigest())
