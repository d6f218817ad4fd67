"""The Apptainer adapter: the only code that builds environment images.

One image per (base image, requirements): an image is named by its environment
key, so a resubmission with the same requirements reuses the image and never
runs pip again. Builds for one key are serialised with a file lock, and a
finished image appears at its final path in one atomic rename, so a reader
sees either no image or a whole one.

An environment image is the base SIF plus one overlay partition holding what
the install wrote (singularity/install.sh.j2, run in the base with a writable
overlay folder): `uv pip install` when BUILD_UV names a uv binary, which is
bound in read-only, else (and when uv refuses the requirements) the base's pip.
Nothing of the base is unpacked or compressed again, so a build costs the
install plus squashing the new packages.

The install is sealed like a job, since an sdist's build backend is a
stranger's code: its own PID namespace, no network but a loopback where a shim
reaches this build's index proxy (index_proxy.py: tunnels to BUILD_INDEX_HOSTS
only). It runs wheels only first, with the shared cache; when the requirements
need a build from source, again in a fresh layer with no cache bound, so
nothing a setup.py writes reaches another build. Directories the install replaced
(an upgraded pip or setuptools) are made whole with whiteouts for the base's
old entries, so every overlay driver shows the same tree.

spython 0.3.14 runs the install, with workarounds for its limits: it runs a
command named ``singularity``, and with ``stream=True`` it streams stdout only,
reading stderr just to print it after a failure -- so our spython client runs,
by absolute path, a small script that runs the configured apptainer with stderr
merged into stdout (pip's errors and apptainer's FATAL lines then reach
BuildError.log); and it gives no handle on the process, so the time limit is
enforced around pip, inside the install script.
"""

from __future__ import annotations

import errno
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from spython.main import get_client
from spython.main.base.command import init_command

from m2d.contract.validation import normalise_requirements

from .index_proxy import IndexProxy, parse_hosts

log = logging.getLogger(__name__)

# The files a build puts into the image: run by path, never imported.
SINGULARITY_DIR = Path(__file__).resolve().parents[2] / "singularity"
INSTALL_TEMPLATE = "install.sh.j2"
BYTECODE_SCRIPT = SINGULARITY_DIR / "bytecode.py"
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


class NoSpace(BuildError):
    """A build stopped by a full disk (the image folder, or apptainer's
    temporary folder): the platform's fault, not the requirements'. Nothing
    is left at the image's path, so no half-written image is ever reused."""


def _no_space(lines) -> bool:
    return any("no space left on device" in line.lower() for line in lines)


@dataclass(frozen=True)
class Image:
    """A researcher environment image: the base plus one set of requirements."""

    key: str
    path: Path
    digest: str
    built: bool  # False when an existing image was reused
    seconds: float
    log: str
    # a build's seconds per step: install, squash, image (the SIF)
    phases: Mapping[str, float] = field(default_factory=dict)


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def environment_key(base_digest: str, requirements: str, python: str = "3.11") -> str:
    normalised = normalise_requirements(requirements)
    return hashlib.sha256(f"{base_digest}\npython {python}\n{normalised}".encode()).hexdigest()


PIP_CACHE_IN_BUILD = "/m2d/pip-cache"
UV_IN_BUILD = "/m2d/uv"
# the build's own folder (requirements, constraints, the script), read-only
BUILD_IN_CONTAINER = "/m2d/build"
CONSTRAINT_IN_BUILD = f"{BUILD_IN_CONTAINER}/constraints.txt"
# The index proxy's socket folder (read-only), and the loopback port pip and uv
# reach it at, through the shim that jobs reach their MLflow relay with.
PROXY_IN_BUILD = "/m2d/proxy"
PROXY_PORT = 3128
SHIM_SOURCE = SINGULARITY_DIR / "relay.py"
# install.sh's exit when wheels alone do not install the requirements
NEEDS_BUILD = 75


@dataclass(frozen=True)
class PipSources:
    """Where builds' pip looks for packages: the site's index, mirrors and
    wheelhouses, and the cache every build shares."""

    index_url: str = ""
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    constraint: str = ""
    cache_dir: str = ""

    def options(self) -> list[str]:
        """pip install's options, as seen inside the build."""
        options = ["--index-url", self.index_url] if self.index_url else []
        for url in self.extra_index_urls:
            options += ["--extra-index-url", url]
        for link in self.find_links:
            options += ["--find-links", link]
        if self.constraint:
            options += ["--constraint", CONSTRAINT_IN_BUILD]
        return options

    def binds(self) -> list[str]:
        """Host folders the build must see at the same path, read-only: local
        wheelhouses and file:// indexes."""
        folders = []
        for location in (self.index_url, *self.extra_index_urls, *self.find_links):
            path = location[len("file://"):] if location.startswith("file://") else location
            if path.startswith("/"):
                folders.append(path.rstrip("/") or "/")
        # a local index's pages link to files beside its simple/ (ROOT/simple, ROOT/files)
        indexes = {location for location in (self.index_url, *self.extra_index_urls)}
        folders = [os.path.dirname(f) if f.endswith("/simple") and any(f in i for i in indexes) else f
                   for f in folders]
        return list(dict.fromkeys(folders))


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


ENVIRONMENT_RECORD = "/opt/venv/m2d-environment"


# install.sh.j2 is shell: every value goes through ``q`` (shell-quoted)
_scripts = jinja2.Environment(loader=jinja2.FileSystemLoader(SINGULARITY_DIR), undefined=jinja2.StrictUndefined,
                              autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
_scripts.filters["q"] = lambda value: shlex.quote(str(value))


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    if not cfg.get(key):
        raise ValueError(f"Set M2D_{key}: {key} has no default (see docs/configuration.md)")
    return cfg[key]


def render_install_script(*, base_digest: str, key: str, python: str, timeout: int,
                          pip: PipSources = PipSources(), uv: bool = False) -> str:
    """The script that installs the requirements (at BUILD_IN_CONTAINER/requirements.txt),
    with uv (bound at UV_IN_BUILD) when ``uv``, else with pip."""
    return _scripts.get_template(INSTALL_TEMPLATE).render(base_digest=base_digest, key=key, python=python, ca_bundle=CA_IN_IMAGE,
                  timeout=timeout, pip_options=" ".join(shlex.quote(o) for o in pip.options()),
                  cache=PIP_CACHE_IN_BUILD if pip.cache_dir else "", uv=UV_IN_BUILD if uv else "",
                  bytecode=f"{BUILD_IN_CONTAINER}/{BYTECODE_SCRIPT.name}",
                  requirements=f"{BUILD_IN_CONTAINER}/requirements.txt", record=ENVIRONMENT_RECORD,
                  shim=f"{BUILD_IN_CONTAINER}/{SHIM_SOURCE.name}", proxy_port=PROXY_PORT,
                  proxy_socket=f"{PROXY_IN_BUILD}/index.sock", needs_build=NEEDS_BUILD)


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
            _give_to_store_owner(shim_dir, shim_dir.parent)
            _give_to_store_owner(shim, shim_dir.parent)
    return shim


def _give_to_store_owner(path: Path, store: Path) -> None:
    """What root (an admin's command, a test run as root) makes in the image
    store goes to the store's owner, the gateway's account: a lock folder or
    scratch folder left root's would lock the gateway's builds out for good."""
    if os.geteuid() == 0:
        owner = store.stat()
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


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


def used_marker(image: Path) -> Path:
    """A file beside the image whose mtime is when the image was last built
    or reused (the image's own mtime is part of its digest cache's identity)."""
    return image.with_name(image.name + ".used")


def mark_used(image: Path) -> None:
    used_marker(image).touch()


def _last_used(image: Path) -> float:
    try:
        return max(image.stat().st_mtime, used_marker(image).stat().st_mtime)
    except FileNotFoundError:  # built before markers existed
        return image.stat().st_mtime


class ImageBuilder:
    def __init__(self, image_dir: Path, base_image: Path, apptainer: str = "apptainer",
                 bind_ca: str | None = "/etc/ssl/certs/ca-certificates.crt",
                 timeout: int = 1800, default_python: str = "3.11",
                 base_images: Mapping[str, str | Path] | None = None,
                 pip: PipSources = PipSources(), mksquashfs: str = "mksquashfs",
                 mksquashfs_args: str = "", uv: str = "",
                 index_hosts: tuple[str, ...] = ("pypi.org", "files.pythonhosted.org")) -> None:
        self.image_dir = Path(image_dir).resolve()
        # Not resolved here: a base may be a symlink that a redeploy moves
        # to a new image, and then new keys (and builds) must follow it.
        self.default_python = default_python
        self.base_images = {version: Path(os.path.abspath(p)) for version, p in (base_images or {}).items()}
        self.base_images[default_python] = Path(os.path.abspath(base_image))
        self.base_image = self.base_images[default_python]
        self.apptainer = apptainer
        self.bind_ca = bind_ca
        self.timeout = timeout
        self.pip = pip
        self.mksquashfs = mksquashfs
        self.mksquashfs_args = mksquashfs_args
        self.uv = uv
        self.index_hosts = parse_hosts(index_hosts)
        if pip.cache_dir:
            Path(pip.cache_dir).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ImageBuilder:
        pip = PipSources(index_url=cfg["PIP_INDEX_URL"], extra_index_urls=tuple(cfg["PIP_EXTRA_INDEX_URLS"]),
                         find_links=tuple(cfg["PIP_FIND_LINKS"]), constraint=cfg["PIP_CONSTRAINT"],
                         cache_dir=cfg["PIP_CACHE_DIR"])
        return cls(_required(cfg, "IMAGE_DIR"), _required(cfg, "BASE_IMAGE"), apptainer=cfg["APPTAINER"],
                   bind_ca=cfg["BUILD_BIND_CA"] or None, timeout=cfg["BUILD_TIMEOUT"],
                   default_python=cfg["DEFAULT_PYTHON"], base_images=cfg["BASE_IMAGES"], pip=pip,
                   mksquashfs=cfg["MKSQUASHFS"], mksquashfs_args=cfg["BUILD_MKSQUASHFS_ARGS"], uv=cfg["BUILD_UV"],
                   index_hosts=tuple(cfg["BUILD_INDEX_HOSTS"]))

    def _base(self, python: str) -> tuple[Path, str]:
        configured = self.base_images.get(python)
        if configured is None:
            raise BuildError(f"this gateway has no base image for Python {python} (it has "
                             f"{', '.join(sorted(self.base_images))}); an administrator adds it to BASE_IMAGES")
        # Resolved once per call, so the digest in the key and the From: line
        # name the same file even if the symlink moves meanwhile.
        try:
            base = configured.resolve(strict=True)
        except OSError as e:
            raise BuildError(f"the base image for Python {python} is missing: {configured}; an administrator "
                             f"builds it (deploy/testbed/base-image.sh DIR {python} on the testbed)") from e
        return base, _cached_digest(base)

    def key_for(self, requirements: str, python: str | None = None) -> str:
        python = python or self.default_python
        return environment_key(self._base(python)[1], requirements, python)

    def path_for(self, key: str) -> Path:
        return self.image_dir / f"env-{key}.sif"

    def ensure(self, requirements: str, python: str | None = None) -> Image:
        started = time.monotonic()
        python = python or self.default_python
        base, base_digest = self._base(python)
        key = environment_key(base_digest, requirements, python)
        path = self.path_for(key)
        # Shared while reusing, exclusive to build or to delete (collect):
        # an image found here is marked used before a collection can judge it.
        with self._lock(key, shared=True):
            found = path.exists()
            if found:
                mark_used(path)
        if not found:
            with self._lock(key):
                # Whoever held the lock before us may have built it.
                if not path.exists():
                    return self._build(key, requirements, python, path, base, base_digest, started)
                mark_used(path)
        return Image(key=key, path=path, digest=_cached_digest(path), built=False,
                           seconds=time.monotonic() - started, log="")

    def collect(self, cutoff: float, keep: set[str], dry_run: bool = False) -> list[Path]:
        """Delete the environment images last built or used before ``cutoff``
        (a time.time()) whose key is not in ``keep``; return them. Base
        images are never touched."""
        removed = []
        for path in sorted(self.image_dir.glob("env-*.sif")):
            key = path.name[len("env-"):-len(".sif")]
            if key in keep:
                continue
            with self._lock(key):
                if not path.exists() or _last_used(path) >= cutoff:
                    continue
                if not dry_run:
                    path.unlink()
                    used_marker(path).unlink(missing_ok=True)
                    log.info("deleted unused image %s", path.name)
                removed.append(path)
        return removed

    @contextmanager
    def _lock(self, key: str, shared: bool = False) -> Iterator[None]:
        # flock, not lockf: flock locks belong to the open file, so two threads
        # of one worker exclude each other as well as two processes do.
        # Lock files stay behind: unlinking one races with a waiter holding it open.
        # Opened read-only: flock needs no write access, so a lock file another
        # account made (an admin's build as root) does not lock the gateway out.
        locks = self.image_dir / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{key}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        for made in (locks, locks / f"{key}.lock"):
            _give_to_store_owner(made, self.image_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _build(self, key: str, requirements: str, python: str, path: Path, base: Path, base_digest: str,
               started: float) -> Image:
        if self.bind_ca is not None and not os.path.isfile(self.bind_ca):
            raise BuildError(f"CA bundle to bind into the build does not exist: {self.bind_ca}")
        if self.uv and not os.access(self.uv, os.X_OK):
            raise BuildError(f"uv to bind into the build is not an executable file: {self.uv} (BUILD_UV)")
        command = _merged_output_command(self.apptainer, self.image_dir / ".bin")

        scratch = self.image_dir / ".build"
        scratch.mkdir(parents=True, exist_ok=True)
        _give_to_store_owner(scratch, self.image_dir)
        # We hold this key's lock, so a folder left for it can only be from a
        # build that was killed.
        for stale in scratch.glob(f"{key}-*"):
            _discard(stale, self.image_dir / ".trash")
        # Inside image_dir, so the final os.replace stays on one filesystem.
        workdir = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=scratch))
        built = False
        try:
            files = workdir / "files"
            files.mkdir()
            (files / "requirements.txt").write_text(requirements if requirements.endswith("\n")
                                                    else requirements + "\n")
            if self.pip.constraint:
                # the build host's /etc is not the container's to share
                shutil.copyfile(self.pip.constraint, files / "constraints.txt")
            shutil.copyfile(BYTECODE_SCRIPT, files / BYTECODE_SCRIPT.name)
            shutil.copyfile(SHIM_SOURCE, files / SHIM_SOURCE.name)
            (files / "install.sh").write_text(render_install_script(
                base_digest=base_digest, key=key, python=python, timeout=self.timeout, pip=self.pip,
                uv=bool(self.uv)))
            overlay = workdir / "overlay"
            overlay.mkdir()
            try:
                lines = self._install(command, base, overlay, files, "wheels", self.timeout)
            except _NeedsBuild as wheels_only:
                # A build backend (a researcher's setup.py) runs now: in a fresh
                # layer, with no cache that another build reads.
                _remove_tree(overlay)
                overlay = workdir / "overlay-build"
                overlay.mkdir()
                left = max(1, int(self.timeout - (time.monotonic() - started)))
                lines = [*wheels_only.lines, *self._install(command, base, overlay, files, "build", left)]
                lines = lines[-LOG_TAIL_LINES:]
            installed = time.monotonic()
            upper = overlay / "upper"
            if not (upper / ENVIRONMENT_RECORD.lstrip("/")).is_file():
                raise BuildError("the install step reported success but installed nothing", log=_tail(lines))
            _prune_empty_folders(upper)
            layer = workdir / "environment.sqfs"
            self._squash(upper, layer, self._whiteouts(base, upper), lines)
            squashed = time.monotonic()
            partial = workdir / "image.sif"
            shutil.copyfile(base, partial)
            self._run(lines, [self.apptainer, "sif", "add", "--datatype", "4", "--partfs", "1", "--parttype", "4",
                              "--partarch", _SIF_ARCH, "--groupid", "1", str(partial), str(layer)],
                      "could not add the environment layer to the image")
            partial.chmod(0o644)
            os.replace(partial, path)
            built = True
            mark_used(path)
            for made in (path, used_marker(path)):
                _give_to_store_owner(made, self.image_dir)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpace(f"no space left in the image folder {self.image_dir}: an administrator frees space",
                              log=str(e)) from e
            raise
        except NoSpace:
            raise
        except BuildError as e:
            if _no_space([str(e), *e.log.splitlines()]):
                raise NoSpace(f"no space left on device while building the image (the image folder "
                              f"{self.image_dir}): an administrator frees space", log=e.log) from e
            raise
        finally:
            # a failed build's folder goes at once: it may be a full disk's
            if built:
                _discard(workdir, self.image_dir / ".trash")
            else:
                _remove_tree(workdir)
        finished = time.monotonic()
        seconds = finished - started
        phases = {"install": installed - started, "squash": squashed - installed, "image": finished - squashed}
        log.info("built %s in %.1f s (install %.1f s, squash %.1f s, image %.1f s)", path.name, seconds,
                 *phases.values())
        return Image(key=key, path=path, digest=_cached_digest(path), built=True,
                     seconds=seconds, log=_tail(lines), phases=phases)

    def _install(self, command: Path, base: Path, overlay: Path, files: Path, mode: str,
                 seconds: int) -> list[str]:
        """Run the install script in ``base`` with ``overlay`` as its writable layer;
        ``mode`` is install.sh's (wheels, build). Raises _NeedsBuild when wheels
        alone do not install the requirements."""
        # Sealed like a job: --contain, a private /tmp and home (pip's scratch
        # stays out of the layer); --pid, its own PID namespace; --net --network
        # none, only a loopback, where the shim reaches the index proxy.
        # A short socket path: /tmp, not the build folder (108 bytes at most).
        proxy_dir = Path(tempfile.mkdtemp(prefix="m2d-index-"))
        try:
            with IndexProxy(str(proxy_dir / "index.sock"), self.index_hosts) as proxy:
                return self._run_install(command, base, overlay, files, mode, seconds, proxy_dir, proxy)
        finally:
            shutil.rmtree(proxy_dir, ignore_errors=True)

    def _run_install(self, command: Path, base: Path, overlay: Path, files: Path, mode: str, seconds: int,
                     proxy_dir: Path, proxy: IndexProxy) -> list[str]:
        options = ["--contain", "--cleanenv", "--pid", "--net", "--network", "none", "--overlay", str(overlay),
                   "--bind", f"{files}:{BUILD_IN_CONTAINER}:ro", "--bind", f"{proxy_dir}:{PROXY_IN_BUILD}:ro"]
        if self.bind_ca:
            options += ["--bind", f"{self.bind_ca}:{CA_IN_IMAGE}:ro"]
        if self.uv:
            options += ["--bind", f"{os.path.realpath(self.uv)}:{UV_IN_BUILD}:ro"]
        for folder in self.pip.binds():
            options += ["--bind", f"{folder}:{folder}:ro"]
        if self.pip.cache_dir and mode == "wheels":
            options += ["--bind", f"{self._pip_cache()}:{PIP_CACHE_IN_BUILD}"]
        if os.geteuid() != 0:
            # pip wants root inside (the venv is root's): a user namespace maps us to it
            options.append("--fakeroot")
        lines: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        log.info("installing %s into %s (%s)", files / "requirements.txt", overlay, mode)
        try:
            stream = _spython_client(command).execute(
                image=str(base), command=["/bin/sh", f"{BUILD_IN_CONTAINER}/install.sh", mode, str(seconds)],
                options=options, stream=True, quiet=True)
            for line in stream:
                line = line.rstrip("\n")
                log.debug("build: %s", line)
                lines.append(line)
        except subprocess.CalledProcessError as e:
            # a build from source would reach for the same refused hosts
            if e.returncode == NEEDS_BUILD and mode == "wheels" and not proxy.refused:
                raise _NeedsBuild(list(lines)) from e
            if proxy.refused:
                lines.append(f"ERROR: the build reached for {', '.join(proxy.refused)}, which is not a package "
                             f"index of this gateway ({', '.join(f'{h}:{p}' for h, p in sorted(proxy.allowed))}). "
                             f"Requirements come from the index: name the package (name==version) instead of "
                             f"a URL, or ask the admins to add the host to BUILD_INDEX_HOSTS.")
            tail = list(lines)
            raise BuildError(f"the install failed (exit {e.returncode}): {_failure_summary(tail)}",
                             log=_tail(tail)) from e
        except (OSError, ValueError) as e:  # no such binary; undecodable output
            raise BuildError(f"could not run apptainer: {e}", log=_tail(lines)) from e
        return list(lines)

    def _pip_cache(self) -> Path:
        """The shared pip cache, one folder per builder uid: pip running as
        root ignores a cache that root does not own, and a --fakeroot build
        sees its own uid as root."""
        folder = Path(self.pip.cache_dir).resolve() / f"uid-{os.geteuid()}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _whiteouts(self, base: Path, upper: Path) -> list[str]:
        """mksquashfs pseudo-file lines that hide the base's entries under
        folders pip replaced. The overlay marked such a folder opaque with an
        xattr of its own driver (kernel or fuse-overlayfs), which another
        driver ignores at run time; a whiteout (a 0:0 character device) means
        the same to every driver."""
        opaque = [folder for folder, _, _ in os.walk(upper)
                  if any(name.endswith("overlay.opaque") for name in _xattrs(folder))]
        if not opaque:
            return []
        inside = ["/" + os.path.relpath(folder, upper) for folder in opaque]
        listing = subprocess.run([self.apptainer, "exec", str(base), "find", *inside, "-mindepth", "1"],
                                 capture_output=True, text=True, timeout=300)
        lines = []
        for entry in listing.stdout.splitlines():
            relative = entry.lstrip("/")
            parent = os.path.dirname(relative)
            # one whiteout at the topmost entry the layer lacks hides all below it
            if os.path.isdir(upper / parent) and not os.path.lexists(upper / relative) \
                    and not os.path.islink(upper / parent):
                lines.append(f"{_pseudo_name(relative)} c 0 0 0 0 0")
        return lines

    def _squash(self, upper: Path, layer: Path, whiteouts: list[str], lines: list[str]) -> None:
        pseudo = []
        if whiteouts:
            pseudo_file = layer.with_suffix(".pseudo")
            pseudo_file.write_text("\n".join(whiteouts) + "\n")
            pseudo = ["-pf", str(pseudo_file)]
        self._run(lines, [self.mksquashfs, str(upper), str(layer), "-noappend", "-no-progress", "-quiet",
                          "-all-root", *pseudo, *shlex.split(self.mksquashfs_args)],
                  "could not write the environment layer (mksquashfs)")

    def _run(self, lines: list[str], argv: list[str], failure: str) -> None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"{failure}: {e}", log=_tail(lines)) from e
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise BuildError(f"{failure}: {output.splitlines()[-1] if output else f'exit {done.returncode}'}",
                             log=_tail([*lines, *output.splitlines()]))


class _NeedsBuild(Exception):
    """The wheels-only install did not install the requirements: ``lines`` is its output."""

    def __init__(self, lines: list[str]):
        super().__init__("the requirements need a build")
        self.lines = lines
# sif add's --partarch numbers
_SIF_ARCH = {"x86_64": "2", "aarch64": "4", "ppc64le": "6", "s390x": "11", "riscv64": "12"}.get(os.uname().machine, "2")


def _xattrs(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def _pseudo_name(relative: str) -> str:
    # mksquashfs pseudo files: a name with spaces or quotes is quoted
    if any(c in relative for c in " \t\"\\"):
        return '"' + relative.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return relative


def _prune_empty_folders(upper: Path) -> None:
    """Remove the empty folders the overlay holds only as mount points for the
    build's binds (wheelhouses, the pip cache, /m2d/build); wheels carry no
    empty folders of their own."""
    for folder, _, _ in os.walk(upper, topdown=False):
        if folder != str(upper) and not os.listdir(folder) and not _xattrs(folder):
            os.rmdir(folder)


def _discard(folder: Path, trash: Path) -> None:
    """Remove a build folder without waiting for it. Its overlay holds every
    file the install wrote (tens of thousands for a scientific stack), and
    deleting them takes seconds on a filesystem mounted with `discard`: the
    folder is renamed into ``trash`` at once and emptied by a thread, which
    also removes what an earlier one left (an rq work horse ends with
    os._exit, which does not wait for threads; other processes do)."""
    trash.mkdir(exist_ok=True)
    _give_to_store_owner(trash, trash.parent)
    try:
        os.replace(folder, trash / folder.name)
    except OSError:
        _remove_tree(folder)
        return
    threading.Thread(target=_empty, args=(trash,), name="m2d-discard").start()


def _empty(trash: Path) -> None:
    try:
        entries = list(trash.iterdir())
    except OSError:  # the image folder itself was removed meanwhile
        return
    for entry in entries:
        _remove_tree(entry)  # two threads on one entry: the second finds it gone


def _remove_tree(folder: Path) -> None:
    """rmtree for a build folder: a --fakeroot overlay's work dir can be mode 000."""
    def make_writable(function, path, _):
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)
        except OSError:
            pass
    shutil.rmtree(folder, onerror=make_writable)
