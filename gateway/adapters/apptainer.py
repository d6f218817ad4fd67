"""The Apptainer adapter: the only code that runs ``apptainer build``.

One image per (base image, requirements): an image is named by its environment
key, so a resubmission with the same requirements reuses the image and never
runs pip again. Builds for one key are serialised with a file lock, and a
finished image appears at its final path in one atomic rename, so a reader
sees either no image or a whole one.

spython 0.3.14 drives the build, with workarounds for its limits: it runs a
command named ``singularity``, and with ``stream=True`` it streams stdout only,
reading stderr just to print it after a failure -- so our spython client runs,
by absolute path, a small script that runs the configured apptainer with stderr
merged into stdout (pip's errors and apptainer's FATAL lines then reach
BuildError.log); and it gives no handle on the process, so the time limit is
enforced around pip, inside %post (singularity/env.def.j2).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spython.main import get_client
from spython.main.base.command import init_command

from ..config import required
from ..templating import render
from ..validation import normalise_requirements

log = logging.getLogger(__name__)

DEFINITION_TEMPLATE = "singularity/env.def.j2"
CA_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"

LOG_TAIL_LINES = 60
LOG_TAIL_BYTES = 8 * 1024
_CHUNK = 1024 * 1024


class BuildError(Exception):
    """A build that produced no image; ``log`` is the tail of its output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log

    @property
    def for_user(self) -> str:
        """What the researcher needs: pip's own ERROR lines, else the log tail
        (Apptainer's INFO lines and the %post trace are noise to them)."""
        errors = [line for line in self.log.splitlines() if line.startswith("ERROR:")]
        return "\n".join(errors) or self.log or str(self)


@dataclass(frozen=True)
class Image:
    """A researcher environment image: the base plus one set of requirements."""

    key: str
    path: Path
    digest: str
    built: bool  # False when an existing image was reused
    seconds: float
    log: str


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def environment_key(base_digest: str, requirements: str) -> str:
    normalised = normalise_requirements(requirements)
    return hashlib.sha256(f"{base_digest}\n{normalised}".encode()).hexdigest()


_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def _cached_digest(path: Path) -> str:
    """file_digest, remembered while the file keeps its mtime and size (images are large)."""
    st = os.stat(path)
    ident = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    with _digests_lock:
        if ident in _digests:
            return _digests[ident]
    digest = file_digest(path)
    with _digests_lock:
        _digests[ident] = digest
    return digest


def render_definition(*, base_image: Path, base_digest: str, key: str,
                      requirements: Path, timeout: int) -> str:
    return render(DEFINITION_TEMPLATE, base_image=base_image, base_digest=base_digest, key=key,
                  requirements=requirements, ca_bundle=CA_IN_IMAGE, timeout=timeout)


_SHIM = """#!/bin/sh
# Written by gateway/adapters/apptainer.py for spython, which streams only its
# command's stdout: stderr carries pip's errors and apptainer's FATAL lines.
exec {apptainer} "$@" 2>&1
"""
_shim_lock = threading.Lock()


def _merged_output_command(apptainer: str, shim_dir: Path) -> Path:
    """A script that runs ``apptainer`` with stderr merged into stdout."""
    target = shutil.which(apptainer)
    if target is None:
        raise BuildError(f"apptainer not found: {apptainer!r}")
    shim = shim_dir / "apptainer-merged"
    script = _SHIM.format(apptainer=shlex.quote(os.path.abspath(target)))
    with _shim_lock:
        if not shim.is_file() or shim.read_text() != script:
            shim_dir.mkdir(parents=True, exist_ok=True)
            tmp = shim_dir / f".apptainer-merged.{os.getpid()}.{threading.get_ident()}"
            tmp.write_text(script)
            tmp.chmod(0o755)
            os.replace(tmp, shim)
    return shim


def _spython_client(command: Path):
    """A spython client of our own that runs ``command`` where it would run
    ``singularity`` from PATH: the process's PATH stays as it is."""
    client = get_client(quiet=True)

    def _init_command(action, flags=None):
        return [str(command), *init_command(client, action, flags)[1:]]

    client._init_command = _init_command
    return client


def _tail(lines) -> str:
    text = "\n".join(lines)
    if len(text.encode()) <= LOG_TAIL_BYTES:
        return text
    cut = text.encode()[-LOG_TAIL_BYTES:].decode(errors="ignore")
    return cut.split("\n", 1)[-1] if "\n" in cut else cut


def _failure_summary(lines) -> str:
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line
    return lines[-1] if lines else ""


class ImageBuilder:
    def __init__(self, image_dir: Path, base_image: Path, apptainer: str = "apptainer",
                 bind_ca: str | None = "/etc/ssl/certs/ca-certificates.crt",
                 timeout: int = 1800) -> None:
        self.image_dir = Path(image_dir).resolve()
        # Not resolved here: the base may be a symlink that a redeploy moves
        # to a new image, and then new keys (and builds) must follow it.
        self.base_image = Path(os.path.abspath(base_image))
        self.apptainer = apptainer
        self.bind_ca = bind_ca
        self.timeout = timeout

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ImageBuilder:
        return cls(required(cfg, "IMAGE_DIR"), required(cfg, "BASE_IMAGE"), apptainer=cfg["APPTAINER"],
                   bind_ca=cfg["BUILD_BIND_CA"] or None, timeout=cfg["BUILD_TIMEOUT"])

    def _base(self) -> tuple[Path, str]:
        # Resolved once per call, so the digest in the key and the From: line
        # name the same file even if the symlink moves meanwhile.
        base = self.base_image.resolve(strict=True)
        return base, _cached_digest(base)

    def key_for(self, requirements: str) -> str:
        return environment_key(self._base()[1], requirements)

    def path_for(self, key: str) -> Path:
        return self.image_dir / f"env-{key}.sif"

    def ensure(self, requirements: str) -> Image:
        started = time.monotonic()
        base, base_digest = self._base()
        key = environment_key(base_digest, requirements)
        path = self.path_for(key)
        if not path.exists():
            with self._lock(key):
                # Whoever held the lock before us may have built it.
                if not path.exists():
                    return self._build(key, requirements, path, base, base_digest, started)
        return Image(key=key, path=path, digest=_cached_digest(path), built=False,
                           seconds=time.monotonic() - started, log="")

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        # flock, not lockf: flock locks belong to the open file, so two threads
        # of one worker exclude each other as well as two processes do.
        # Lock files stay behind: unlinking one races with a waiter holding it open.
        locks = self.image_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _build(self, key: str, requirements: str, path: Path, base: Path, base_digest: str,
               started: float) -> Image:
        if self.bind_ca is not None and not os.path.isfile(self.bind_ca):
            raise BuildError(f"CA bundle to bind into the build does not exist: {self.bind_ca}")
        command = _merged_output_command(self.apptainer, self.image_dir / ".bin")

        scratch = self.image_dir / ".build"
        scratch.mkdir(parents=True, exist_ok=True)
        # We hold this key's lock, so a folder left for it can only be from a
        # build that was killed.
        for stale in scratch.glob(f"{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Inside image_dir, so the final os.replace stays on one filesystem.
        workdir = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=scratch))
        try:
            reqs = workdir / "requirements.txt"
            reqs.write_text(requirements if requirements.endswith("\n") else requirements + "\n")
            definition = workdir / "env.def"
            definition.write_text(render_definition(
                base_image=base, base_digest=base_digest, key=key,
                requirements=reqs, timeout=self.timeout))
            # apptainer build asks before overwriting, so the target must not exist yet.
            partial = workdir / "image.sif"
            lines = self._run_build(command, definition, partial)
            if not partial.is_file():
                raise BuildError("apptainer build reported success but wrote no image",
                                 log=_tail(lines))
            os.replace(partial, path)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        seconds = time.monotonic() - started
        log.info("built %s in %.1f s", path.name, seconds)
        return Image(key=key, path=path, digest=_cached_digest(path), built=True,
                           seconds=seconds, log=_tail(lines))

    def _run_build(self, command: Path, definition: Path, image: Path) -> list[str]:
        options = ["--bind", f"{self.bind_ca}:{CA_IN_IMAGE}"] if self.bind_ca else []
        if os.geteuid() != 0:
            # pip in %post wants root inside: a user namespace maps us to it
            options.append("--fakeroot")
        lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        log.info("building %s from %s", image, definition)
        try:
            # Non-stream Client.build returns None on failure and discards the
            # output; the stream raises CalledProcessError once it is drained.
            # sudo defaults to True for build; workers already run as the user
            # that builds.
            _, stream = _spython_client(command).build(recipe=str(definition), image=str(image), sudo=False,
                                     stream=True, options=options, quiet=True)
            for line in stream:
                line = line.rstrip("\n")
                log.debug("build: %s", line)
                lines.append(line)
        except subprocess.CalledProcessError as e:
            tail = list(lines)
            raise BuildError(
                f"apptainer build failed (exit {e.returncode}): {_failure_summary(tail)}",
                log=_tail(tail)) from e
        except (OSError, ValueError) as e:  # no such binary; undecodable output
            raise BuildError(f"could not run apptainer build: {e}", log=_tail(lines)) from e
        return list(lines)
