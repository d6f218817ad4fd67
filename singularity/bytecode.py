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


def bring(pairs, cache):
    """Give each (source, pyc) pair its .pyc: the cache's, else compiled (and
    then kept in the cache). Returns (from the cache, compiled)."""
    hits = compiled = 0
    folders = set()
    for source, pyc in pairs:
        entry = cache_entry(cache, source) if cache else ""
        if entry and os.path.isfile(entry):
            folder = os.path.dirname(pyc)
            if folder not in folders:
                os.makedirs(folder, exist_ok=True)
                folders.add(folder)
            # the build's own overlay: no one else writes here
            with open(entry, "rb") as f, open(pyc, "wb") as out:
                out.write(f.read())
            hits += 1
        # quiet=2: a module that does not compile (a file for another Python
        # in a package's tests) stays without .pyc, as pip leaves it
        elif py_compile.compile(source, cfile=pyc, invalidation_mode=MODE, quiet=2):
            compiled += 1
            if entry:
                with open(pyc, "rb") as f:
                    copy_atomically(f.read(), entry)
    return hits, compiled


def main(argv):
    cache = argv[argv.index("--cache") + 1] if "--cache" in argv else ""
    if "--worker" in argv:  # a share of the modules on stdin: source NUL pyc NUL ...
        names = sys.stdin.buffer.read().decode().split("\0")[:-1]
        print(*bring(zip(names[::2], names[1::2]), cache))
        return 0
    started = time.monotonic()
    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    stale = list(stale_modules(roots))
    # py_compile is single-threaded, and copies wait on the disk: one worker per CPU
    workers = max(1, min(os.cpu_count() or 1, len(stale)))
    command = [sys.executable, "-I", os.path.abspath(__file__), "--worker"] + (["--cache", cache] if cache else [])
    procs = []
    for share in (stale[i::workers] for i in range(workers)) if stale else ():
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # a worker reads all of its share before working, so this never waits on one
        proc.stdin.write("".join(f"{source}\0{pyc}\0" for source, pyc in share))
        proc.stdin.close()
        procs.append(proc)
    hits = compiled = failed = 0
    for proc in procs:
        counts = proc.stdout.read().split()
        failed += proc.wait() != 0
        if len(counts) == 2:
            hits, compiled = hits + int(counts[0]), compiled + int(counts[1])
    print(f"bytecode: {len(stale)} modules, {hits} from the cache, {compiled} compiled, "
          f"in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
