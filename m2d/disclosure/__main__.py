"""python -m m2d.disclosure index|report|membership-plan|membership|rounded-view: see m2d/disclosure/__init__.py and docs/disclosure.md.

Exit codes: 0 done (report: no file fails); 3 the report was written and some
file fails; 4 (rounded-view) no model file to round; 2 a usage error; 1 the
checker broke (no report written).
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
    report.add_argument("--membership-plan", metavar="PLAN.json",
                        help="the membership plan (membership-plan): add a membership check to the model files")
    report.add_argument("--membership", metavar="OUT.json", help="what the membership step's predict wrote")
    report.add_argument("--membership-exit", default="", help="the membership step's exit code (124: timed out)")
    report.add_argument("--membership-error", help="why no membership step ran (a review reason)")
    report.add_argument("--membership-seconds", type=int, help="the membership step's time limit, for the reason")
    report.add_argument("--mia-fail-auc", type=float, default=0.8)
    report.add_argument("--mia-review-auc", type=float, default=0.6)
    report.add_argument("--mia-min-cases", type=int, default=20)
    report.add_argument("--rounded-view", metavar="VIEW.json",
                        help="the rounded view's manifest (rounded-view): add a sanitised-metric check to the "
                             "files that leave as their sanitised copy")
    report.add_argument("--rounded-membership", metavar="OUT.json", help="what predict wrote on the rounded view")
    report.add_argument("--rounded-exit", default="", help="that predict step's exit code (124: timed out); "
                                                           "'view': the view could not be made")
    report.add_argument("--sanitised-max-auc-drop", type=float, default=0.05,
                        help="the rounded copy's held-out AUC may be this much below the original's (else review)")
    plan = commands.add_parser("membership-plan", help="choose the images a membership attack asks predict about")
    plan.add_argument("--dataset", required=True)
    plan.add_argument("--max-images", type=int, required=True, help="per split")
    plan.add_argument("--out", required=True)
    member = commands.add_parser("membership", help="call the submission's predict on the plan's images "
                                                    "(runs in the submission's image: standard library only)")
    member.add_argument("--plan", required=True)
    member.add_argument("--code", required=True)
    member.add_argument("--entry", required=True, help="module:function")
    member.add_argument("--export", required=True)
    member.add_argument("--out", required=True)
    view = commands.add_parser("rounded-view", help="the export as released, for predict: each model file "
                                                    "rounded in its own format, the rest linked")
    view.add_argument("--export", required=True)
    view.add_argument("--view", required=True, help="an empty folder to fill")
    view.add_argument("--link-to", required=True, help="where predict sees the export as written")
    view.add_argument("--sanitise-bits", type=int, required=True, metavar="N")
    view.add_argument("--manifest", required=True, help="VIEW.json: what was rounded, from which bytes")
    args = parser.parse_args(argv)
    try:
        if args.command == "rounded-view":
            from . import rounded
            from .report import write_json
            manifest = rounded.make_view(args.export, args.view, args.link_to, args.sanitise_bits)
            write_json(args.manifest, manifest)
            return 0 if manifest["rounded"] else rounded.EXIT_NOTHING_ROUNDED
        if args.command == "membership":
            from . import membership
            return membership.predict(args.plan, args.code, args.entry, args.export, args.out)
        if args.command == "membership-plan":
            from . import membership
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(membership.plan(args.dataset, args.max_images), f)
            return 0
        if args.command == "index":
            from . import index as index_module
            if not index_module.build(args.dataset, args.out, jobs=args.jobs):
                print(f"index: {args.out} is up to date")
            return 0
        result = _membership_result(args)
        rounded = _rounded_result(args, result)
        # the attack on what leaves: only where the view rounded something (else it is the original again)
        status = None if result is None else membership_status(result, args, rounded[0] if rounded and rounded[1]
                                                               else None)
        data = make_report(args.index, args.export, args.train_count, replace(Limits(), seconds=args.max_seconds),
                           args.sanitise_bits, os.path.dirname(os.path.abspath(args.out)), status,
                           _sanitised_metric(args, result, rounded))
        from .report import acro_results, write_json
        write_json(args.out, data)
        if args.acro_out:
            write_json(args.acro_out, acro_results(data))
        print(json.dumps(data["summary"]))
        return EXIT_FAIL if data["summary"]["fail"] else 0
    except (OSError, ValueError) as e:
        print(f"m2d.disclosure: {e}", file=sys.stderr)
        return 1


def _membership_result(args) -> dict | None:
    """The membership step's result (membership.run), or None when the submission declares no predict."""
    from . import membership
    if args.membership_error:
        return {"error": args.membership_error}
    if not args.membership_plan:
        return None
    try:
        plan = membership.load_plan(args.membership_plan)
    except (OSError, ValueError) as e:
        return {"error": f"its plan (the images to ask about) could not be made ({type(e).__name__})"}
    return membership.run(plan, membership.read_bounded(args.membership) if args.membership else None,
                          _exit_code(args.membership_exit), args.membership_seconds)


def membership_status(result: dict, args, rounded: dict | None = None) -> tuple[str, str, dict]:
    """The membership check's (status, reason, the attack's numbers on the
    original and on the rounded copy: membership.attack)."""
    from . import membership
    return (*membership.status(result, args.mia_fail_auc, args.mia_review_auc, args.mia_min_cases, rounded),
            membership.attack(result, rounded))


def _sanitised_metric(args, original: dict | None, rounded: tuple[dict, dict | None] | None
                      ) -> tuple[str, str, dict, dict | None] | None:
    """The sanitised-metric check's (status, reason, held_out, the rounded
    view's {path: sha256}), or None where there is none (_rounded_result)."""
    from . import membership
    if rounded is None:
        return None
    copy, view = rounded
    return (*membership.compare(original, copy, args.sanitised_max_auc_drop), view)


def _rounded_result(args, original: dict | None) -> tuple[dict, dict | None] | None:
    """``membership.run``'s result of predict on the rounded view (the export as
    released) and the view's {path: sha256} (None: not made); None where there
    is none: no predict declared, no sanitised copies made (no
    --sanitise-bits), no --rounded-view asked for."""
    from . import membership, rounded
    if original is None or args.sanitise_bits is None or not args.rounded_view:
        return None
    view = None
    try:
        with open(args.rounded_view, encoding="utf-8") as f:
            manifest = json.load(f)
        if isinstance(manifest, dict) and manifest.get("version") == rounded.VERSION \
                and manifest.get("mantissa_bits") == args.sanitise_bits and isinstance(manifest.get("rounded"), dict):
            view = manifest["rounded"]
    except (OSError, ValueError):
        pass  # not made: review, saying so
    if "error" in original:
        copy = {"error": "not run"}
    elif view is None:
        why = f" (exit {args.rounded_exit})" if args.rounded_exit not in ("", "view") else ""
        copy = {"error": f"the rounded view of the export could not be made{why}"}
    else:
        copy = membership.run(membership.load_plan(args.membership_plan),
                              membership.read_bounded(args.rounded_membership) if args.rounded_membership else None,
                              _exit_code(args.rounded_exit), args.membership_seconds)
    return copy, view


def _exit_code(text: str) -> int | None:
    return int(text) if text.strip().lstrip("-").isdigit() else None


def make_report(index_dir, export, train_count: int | None = None, limits: Limits = Limits(),
                sanitise_bits: int | None = None, report_dir=None, membership: tuple | None = None,
                sanitised_metric: tuple[str, str, dict, dict | None] | None = None) -> dict:
    from .index import Index
    from .report import Checker
    return Checker(Index.load(index_dir), limits, train_count, sanitise_bits=sanitise_bits, report_dir=report_dir,
                   membership=membership, sanitised_metric=sanitised_metric).run(export)


if __name__ == "__main__":
    sys.exit(main())
