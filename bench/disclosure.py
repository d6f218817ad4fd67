"""What the disclosure checker (m2d/disclosure) costs: index build, report per GB and per model.

    .venv/bin/python -m bench.disclosure [--export-gb 1] [--large-cases 40] [--large-size 1024x1280]

On two synthetic CLaM datasets made by m2d/contract/sample_data.py (the testbed's
10 cases at 128x160, and --large-cases cases at --large-size, closer to real
mammograms' megapixels) prints, for each:
  index     seconds to build the fingerprint index, MB/s of dataset, the index's size;
  model     seconds to report on one ResNet-18 model.tar (as the CLaM sample saves it);
  export    seconds per GB of export (model checkpoints and random binary files,
            --export-gb in all);
and the smallest pHash distance between two different dataset images (images.NEAR's margin).
Timings only: nothing here asserts. Times are CPU seconds (this process and its
children), wall seconds beside them: the testbed's 2 cores are shared.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from m2d.contract import sample_data
from m2d.disclosure import images
from m2d.disclosure import index as disclosure_index
from m2d.disclosure.index import Index
from m2d.disclosure.report import Checker
from tests.helpers import disclosure_exports as make


def timed(f):
    """(CPU seconds of this process and its children, result): on a shared, loaded
    machine wall time says more about the neighbours than about the checker."""
    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    start, wall = cpu(), time.perf_counter()
    result = f()
    timed.wall = time.perf_counter() - wall
    return cpu() - start, result


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def min_phash_distance(dataset: Path) -> int:
    """The smallest pHash distance between two different images of the dataset (their PNGs)."""
    from PIL import Image
    hashes = []
    for png in sorted(dataset.rglob("*.png")):
        with Image.open(png) as im:
            hashes.append(images.as_words(images._hash(im)))
    arr = np.array(hashes, dtype=np.uint64)
    best = images.BITS
    for i in range(len(arr) - 1):
        x = np.bitwise_xor(arr[i + 1:], arr[i])
        best = min(best, int(np.unpackbits(x.view(np.uint8), axis=1).sum(axis=1).min()))
    return best


def bench(name: str, dataset: Path, work: Path, export_gb: float, jobs: int) -> None:
    size = folder_bytes(dataset)
    index_dir = work / f"index-{name}"
    seconds, _ = timed(lambda: disclosure_index.build(dataset, index_dir, jobs=jobs, log=lambda _: None))
    index = Index.load(index_dir)
    print(f"{name}: dataset {size / 1e6:.1f} MB, {index.version['files']} files; index built in {seconds:.1f} CPU s "
          f"({size / 1e6 / seconds:.1f} MB per CPU s; {timed.wall:.1f} s wall with {jobs} process(es)), "
          f"{folder_bytes(index_dir) / 1e6:.2f} MB; "
          f"{len(index.phashes)} images, nearest two different ones {min_phash_distance(dataset)} of {images.BITS} bits "
          f"apart (copies: <= {images.NEAR})")
    again, _ = timed(lambda: disclosure_index.build(dataset, index_dir, log=lambda _: None))
    print(f"{name}: an up-to-date index is recognised in {again:.2f} s")

    one = work / f"model-{name}"
    one.mkdir()
    make.save_clam_model(one / "model.tar")
    seconds, report = timed(lambda: Checker(index).run(one))
    model_mb = (one / "model.tar").stat().st_size / 1e6
    print(f"{name}: one ResNet-18 model.tar ({model_mb:.0f} MB): {seconds:.1f} CPU s "
          f"({timed.wall:.1f} s wall), {report['files'][0]['status']}")

    bulk = work / f"export-{name}"
    bulk.mkdir()
    written, n = 0, 0
    target = int(export_gb * 1e9)
    rng = np.random.default_rng(0)
    while written < target:
        if n % 2 == 0:
            shutil.copy(one / "model.tar", bulk / f"model-{n}.tar")
        else:
            (bulk / f"blob-{n}.bin").write_bytes(rng.bytes(min(64 << 20, target - written)))
        written = folder_bytes(bulk)
        n += 1
    seconds, report = timed(lambda: Checker(index).run(bulk))
    print(f"{name}: export of {written / 1e9:.2f} GB in {n} files: {seconds:.1f} CPU s "
          f"({timed.wall:.1f} s wall), {seconds / (written / 1e9):.1f} CPU s per GB; {report['summary']}")
    shutil.rmtree(bulk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-gb", type=float, default=1.0)
    parser.add_argument("--large-cases", type=int, default=40)
    parser.add_argument("--large-size", default="1024x1280")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="index build processes")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-disclosure-") as tmp:
        work = Path(tmp)
        sample_data.generate(work / "testbed", cases=10)
        bench("testbed (10 cases, 128x160)", work / "testbed", work, args.export_gb, args.jobs)
        sample_data.generate(work / "large", cases=args.large_cases, size=sample_data.parse_size(args.large_size))
        bench(f"large ({args.large_cases} cases, {args.large_size})", work / "large", work, args.export_gb, args.jobs)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
