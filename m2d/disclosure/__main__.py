"""python -m m2d.disclosure index|report: see m2d/disclosure/__init__.py and docs/disclosure.md.

Exit codes: 0 done (report: no file fails); 3 the report was written and some
file fails; 2 a usage error; 1 the checker broke (no report written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from .limits import Limits

EXIT_FAIL = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2d.disclosure", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser("index", help="build the dataset's fingerprint index (once per dataset version)")
    index.add_argument("--dataset", required=True)
    index.add_argument("--out", required=True)
    index.add_argument("--jobs", type=int, default=1, help="processes fingerprinting files")
    report = commands.add_parser("report", help="check an export folder against an index")
    report.add_argument("--index", required=True)
    report.add_argument("--export", required=True)
    report.add_argument("--out", required=True, help="REPORT.json")
    report.add_argument("--train-count", type=int, help="training cases (default: the index's Split=train count)")
    report.add_argument("--acro-out", help="also write ACRO's results.json shape here (SACRO-Viewer)")
    report.add_argument("--max-seconds", type=float, default=Limits.seconds)
    report.add_argument("--sanitise-bits", type=int, metavar="N",
                        help="also re-save each top-level model file as plain tensors, floats rounded to N "
                             "mantissa bits, into OUT's folder (sanitised/<sha256>.safetensors): the copy that "
                             "is released in its place (off when not given)")
    args = parser.parse_args(argv)
    try:
        if args.command == "index":
            from . import index as index_module
            if not index_module.build(args.dataset, args.out, jobs=args.jobs):
                print(f"index: {args.out} is up to date")
            return 0
        data = make_report(args.index, args.export, args.train_count, replace(Limits(), seconds=args.max_seconds),
                           args.sanitise_bits, os.path.dirname(os.path.abspath(args.out)))
        from .report import acro_results, write_json
        write_json(args.out, data)
        if args.acro_out:
            write_json(args.acro_out, acro_results(data))
        print(json.dumps(data["summary"]))
        return EXIT_FAIL if data["summary"]["fail"] else 0
    except (OSError, ValueError) as e:
        print(f"m2d.disclosure: {e}", file=sys.stderr)
        return 1


def make_report(index_dir, export, train_count: int | None = None, limits: Limits = Limits(),
                sanitise_bits: int | None = None, report_dir=None) -> dict:
    from .index import Index
    from .report import Checker
    return Checker(Index.load(index_dir), limits, train_count, sanitise_bits=sanitise_bits,
                   report_dir=report_dir).run(export)


if __name__ == "__main__":
    sys.exit(main())
