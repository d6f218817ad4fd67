"""Write the testbed's synthetic CLaM sample (the generator is m2d/contract/sample_data.py).

    python deploy/testbed/make_dataset.py [DEST] [--cases 10] [--seed 0]
    python deploy/testbed/make_dataset.py TWIN_DIR --twin [VERSION] [--like DATASET]

DEST defaults to $M2D_TESTBED_DIR/clam (else /opt/testbed/clam).  An existing,
complete dataset at DEST is left as it is.  With --twin, the dry runs' synthetic
twin of that dataset version (default: the gateway's default) goes to
TWIN_DIR/VERSION, shaped like the dataset at --like (default: the testbed's;
m2d/contract/twin.py: what the gateway makes from DATASET_DIR).  Needs numpy and Pillow (the
project's .venv/bin/python, as up.sh runs it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# up.sh runs this file by its path, so Python looks for imports beside it; the
# generator lives in the repository's m2d package, two folders up.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from m2d.contract import sample_data, twin  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    default_dest = Path(os.environ.get("M2D_TESTBED_DIR", "/opt/testbed")) / "clam"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, default=default_dest)
    parser.add_argument("--cases", type=int, default=sample_data.DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--twin", metavar="VERSION", nargs="?", const=twin.DEFAULT_VERSION,
                        help="make the twin of this dataset version in DEST/VERSION")
    parser.add_argument("--like", type=Path, default=default_dest,
                        help="with --twin: the dataset whose split x label x view counts it mirrors")
    args = parser.parse_args(argv)
    if args.twin:
        made = twin.ensure(args.dest, args.twin, dataset=args.like)
        print(f"make_dataset: the twin of dataset version {args.twin} is in {made}")
        return 0
    if sample_data.generate(args.dest, cases=args.cases, seed=args.seed):
        print(f"make_dataset: wrote {args.cases} cases (seed {args.seed}) to {args.dest}")
    else:
        print(f"make_dataset: {args.dest} already holds a complete dataset; left as it is")
    return 0


if __name__ == "__main__":
    sys.exit(main())
