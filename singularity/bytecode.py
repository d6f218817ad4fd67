"""Compile the build's new modules to .pyc, reusing what earlier builds compiled.

    /opt/venv/bin/python bytecode.py [--cache FOLDER]

Run inside a build (singularity/install.sh.j2) by the image's own Python, after
uv installed the requirements. A job's image is read-only, so a module without
its .pyc is compiled again at every import of every job; compiling a stack
like scikit-learn's takes seconds of CPU, the same for every image that holds
it. The cache keeps each .pyc under the sha256 of the interpreter's magic
number, the module's path and its source, so an entry stands only for the very
file it was compiled from. The .pyc files are hash-checked (PEP 552): valid
for their source whatever the file's mtime (uv's copies get new ones), and an
import recompiles a module whose source no longer matches.

Standard library only, Python 3.9 and later (the base images' Pythons).
"""
import hashlib
import importlib.util
import os
import py_compile
import subprocess
import sys
import sysconfig
import tempfile
import time

MODE = py_compile.PycInvalidationMode.CHECKED_HASH


def is_current(source, pyc):
    """Whether ``pyc`` is a valid .pyc of ``source`` for this interpreter, as
    the import system judges it (the base venv's own modules have theirs)."""
    try:
        with open(pyc, "rb") as f:
            header = f.read(16)
        if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
            return False
        if int.from_bytes(header[4:8], "little") & 1:  # hash-based
            with open(source, "rb") as f:
                return importlib.util.source_hash(f.read()) == header[8:16]
        st = os.stat(source)
        return (int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF)
    except OSError:
        return False


def stale_modules(roots):
    for root in roots:
        for folder, folders, files in os.walk(root):
            folders[:] = [name for name in folders if name != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    source = os.path.join(folder, name)
                    pyc = importlib.util.cache_from_source(source)
                    if not is_current(source, pyc):
                        yield source, pyc


def cache_entry(cache, source):
    with open(source, "rb") as f:
        digest = hashlib.sha256(importlib.util.MAGIC_NUMBER + source.encode() + b"\0" + f.read()).hexdigest()
    return os.path.join(cache, digest[:2], digest[2:])


def copy_atomically(data, path):
    """Write ``data`` to ``path`` whole or not at all: concurrent builds share the cache."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def compile_modules(pairs, cache):
    """Compile (source, pyc) pairs; each .pyc that compiled goes into the cache."""
    for source, pyc in pairs:
        # quiet=2: a module that does not compile (a file for another Python
        # in a package's tests) stays without .pyc, as pip leaves it
        if py_compile.compile(source, cfile=pyc, invalidation_mode=MODE, quiet=2) and cache:
            with open(pyc, "rb") as f:
                copy_atomically(f.read(), cache_entry(cache, source))


def main(argv):
    cache = argv[argv.index("--cache") + 1] if "--cache" in argv else ""
    if "--worker" in argv:  # a share of the misses on stdin: source NUL pyc NUL ...
        names = sys.stdin.buffer.read().decode().split("\0")[:-1]
        compile_modules(zip(names[::2], names[1::2]), cache)
        return 0
    started = time.monotonic()
    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    hits, misses = 0, []
    for source, pyc in stale_modules(roots):
        entry = cache_entry(cache, source) if cache else ""
        if entry and os.path.isfile(entry):
            with open(entry, "rb") as f:
                copy_atomically(f.read(), pyc)
            hits += 1
        else:
            misses.append((source, pyc))
    # py_compile is single-threaded: one worker process per CPU
    workers = max(1, min(os.cpu_count() or 1, len(misses)))
    shares = [misses[i::workers] for i in range(workers)] if misses else []
    command = [sys.executable, os.path.abspath(__file__), "--worker"] + (["--cache", cache] if cache else [])
    procs = []
    for share in shares:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE)
        # a worker reads all of its share before compiling, so this never waits on one
        proc.stdin.write("".join(f"{source}\0{pyc}\0" for source, pyc in share).encode())
        proc.stdin.close()
        procs.append(proc)
    failed = [proc.returncode for proc in procs if proc.wait()]
    print(f"bytecode: {hits} modules from the cache, {len(misses)} compiled, in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
