"""The `m2d` command line: a thin layer over the package's functions.

    python -m m2d COMMAND --help

Exit status: 0 when the command did what it says; 1 when the platform refuses
the zip, the gateway answers with an error, a submission did not complete, or
main.py failed (`run` exits with main.py's own code); 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from . import __version__, archive, config
from .contract import twin
from .errors import ApiError, LocalRunError

RUN_HELP = """\
Run a submission on this machine the way the platform runs it. The folder is
zipped and the zip checked and unpacked as the gateway does; main.py runs from
the unpacked code with DATASET at /mnt/dataset (read-only) and EXPORT at
/mnt/export, and exits with main.py's exit code. Without --dataset, DATASET is
the platform's dry-run twin of the dataset (the same generator and parameters,
made once into ~/.cache/m2d/twin/VERSION; VERSION from --dataset-version or
M2D_DATASET_VERSION) and main.py sees M2D_DRY_RUN=1, as in the platform's dry
run. Caches live in ~/.cache/m2d (M2D_CACHE_DIR overrides).

Apptainer mode (the default where `apptainer` is on PATH): the platform's own
sealed container. The environment image is the platform's base image (--base-image
or M2D_BASE_IMAGE, else built once from the platform's definition) with
requirements.txt installed, cached under ~/.cache/m2d/images; main.py runs in
`apptainer exec --containall --cleanenv --no-privs --net --network none` with
the code read-only at /code, and its MLflow calls go through the platform's
relay to the server MLFLOW_TRACKING_URI names, or to a local MLflow server
started on --mlruns (the `mlflow` command must be on PATH).

Virtualenv mode (--mode venv, or no Apptainer): requirements.txt is installed
into a virtualenv cached by its hash under ~/.cache/m2d/venvs; the two folders
are bound in a private mount namespace (as root, or through a user namespace
where the kernel allows one; otherwise main.py is told them through
M2D_DATASET_DIR and M2D_EXPORT_DIR, and m2d says so). main.py gets a clean
environment as on the platform, plus --env values; MLflow logs to the local
file store in --mlruns unless MLFLOW_TRACKING_URI is set.
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except archive.Refusal as refusal:
        return _fail(args, refusal.code, refusal.message,
                     prefix=f"m2d: the platform would refuse {getattr(args, 'source', 'this zip')}:\n")
    except (config.NotLoggedIn, FileExistsError, NotADirectoryError, ValueError) as e:
        return _fail(args, type(e).__name__, str(e))
    # The client's and the local runner's errors carry a code and a message that
    # says what to do; anything else is a bug and keeps its traceback.
    except ApiError as e:
        return _fail(args, e.code, e.message)
    except LocalRunError as e:
        return _fail(args, "local_run", str(e))
    except KeyboardInterrupt:
        return 130


# --- the commands ----------------------------------------------------------------


def sample_data(args) -> int:
    from .contract import sample_data as generator  # numpy and Pillow: only this command needs them

    size = generator.parse_size(args.size)
    written = generator.generate(args.out, cases=args.cases, size=size, seed=args.seed, floor=args.min_per_cell)
    if written:
        made = generator.counts(args.out)
        shape = ", ".join(f"{split} {label} {n}" for (split, label), n in made.cases.items())
        text = (f"wrote a synthetic CLaM sample to {args.out}: {made.total} cases ({shape}), "
                f"{args.size} images, seed {args.seed}")
    else:
        text = f"{args.out} already holds a complete dataset; left as it is (remove it to make another)"
    return _done(args, {"out": str(args.out), "written": written}, text)


def check(args) -> int:
    checked = archive.check(args.source)
    return _done(args, _checked_dict(args.source, checked), _checked_text(args.source, checked))


def zip_folder(args) -> int:
    out = Path(args.output or f"{Path(args.source).resolve().name}.zip")
    zipped = archive.make_zip(args.source, out)
    checked = archive.check(zipped.path)
    lines = [f"wrote {out} ({len(zipped.files)} files)"]
    lines += [f"  left out: {item}" for item in zipped.skipped]
    lines.append(_checked_text(out, checked))
    return _done(args, _checked_dict(out, checked) | {"skipped": zipped.skipped}, "\n".join(lines))


def login(args) -> int:
    from .client import Client

    settings = config.Settings(url=args.url.rstrip("/"), token=args.token)
    me = Client(settings).me()  # only a working URL and token are worth keeping
    path = config.save(settings.url, settings.token)
    mlflow = me.get("mlflow") or {}
    text = (f"logged in to {settings.url} as {me['email']}; settings saved in {path}\n"
            f"MLflow user {mlflow.get('username')} at {mlflow.get('tracking_uri')}, "
            f"experiment {mlflow.get('experiment_name')}")
    return _done(args, {"url": settings.url, "config": str(path), "me": me}, text)


def submit(args) -> int:
    client = _client()
    with tempfile.TemporaryDirectory(prefix="m2d-submit-") as work:
        source = Path(args.source)
        zip_path = source
        if source.is_dir():
            zip_path = archive.make_zip(source, Path(work) / f"{source.resolve().name}.zip").path
        archive.check(zip_path)  # a refusal here costs no upload
        submission = client.submit(zip_path)
    text = (f"submitted {args.source} as submission {submission['id']} ({submission['status']}).\n"
            f"Follow it: m2d wait {submission['id']}")
    return _done(args, submission, text)


def status(args) -> int:
    client = _client()
    if args.id is None:
        submissions = client.submissions()
        if not submissions:
            return _done(args, {"submissions": []}, "no submissions yet")
        return _done(args, {"submissions": submissions}, "\n".join(_summary(s) for s in submissions))
    submission = client.submission(args.id)
    return _done(args, submission, _details(submission))


def usage(args) -> int:
    """Your Slurm account: what you used this period against your limits."""
    found = _client().usage()
    if not found.get("account"):
        return _done(args, found, "your jobs run under the cluster's shared account")
    used, limits = found.get("usage") or {}, found["limits"]
    def limit(key):
        return limits.get(key) or "no limit"
    lines = [f"Slurm account {found['account']}" + (f" (usage since {found['period_start'][:10]})"
                                                    if found.get("period_start") else ""),
             f"  GPU minutes: {used.get('gpu_minutes_used', 0)} of {limit('gpu_minutes')}",
             f"  CPU minutes: {used.get('cpu_minutes_used', 0)}",
             f"  jobs running at once: {limit('max_running')}; running and waiting: {limit('max_queued')}; "
             f"longest job: {limit('max_wall')}"]
    if used.get("fair_share") is not None:
        lines.append(f"  fair-share factor: {used['fair_share']:.3f} (1: you used least)")
    if found.get("error"):
        lines.append(f"  (Slurm did not answer just now: {found['error']})")
    return _done(args, found, "\n".join(lines))


def wait(args) -> int:
    from .client import is_completed

    client = _client()

    def show(submission):
        if not args.json:
            print(_summary(submission), flush=True)

    try:
        submission = client.wait(args.id, timeout_s=args.timeout, on_change=show)
    except TimeoutError as e:
        return _fail(args, "timeout", str(e))
    if args.json:
        print(json.dumps(submission, indent=2))
    elif not is_completed(submission):
        print(_details(submission))
    return 0 if is_completed(submission) else 1


def cancel(args) -> int:
    submission = _client().cancel(args.id)
    return _done(args, submission, f"submission {submission['id']}: {submission['status']}")


def logs(args) -> int:
    """The dry run's whole log (the twin: nothing hidden) and the real run's
    bounded tail of stderr, as the gateway keeps them."""
    submission = _client().submission(args.id)
    dry_run = submission.get("dry_run") or {}
    real_tail = submission.get("error") if submission.get("slurm_job_id") else None
    data = {"id": submission["id"], "status": submission["status"],
            "dry_run": {"slurm_job_id": dry_run.get("slurm_job_id"), "exit_code": dry_run.get("exit_code"),
                        "reason": dry_run.get("reason"), "log": dry_run.get("log")},
            "real_run": {"slurm_job_id": submission.get("slurm_job_id"), "exit_code": submission.get("exit_code"),
                         "reason": submission.get("reason"), "stderr_tail": real_tail}}
    lines = [f"submission {submission['id']}: {submission['status']}"]
    if dry_run:
        lines.append(f"==== dry run on the synthetic twin (Slurm job {dry_run.get('slurm_job_id')}, "
                     f"exit code {dry_run.get('exit_code')}): its whole log")
        lines.append((dry_run.get("log") or "(no log yet)").rstrip())
    else:
        lines.append("==== no dry run (dry runs are off for this submission)")
    if submission.get("slurm_job_id"):
        lines.append(f"==== real run (Slurm job {submission['slurm_job_id']}, exit code {submission.get('exit_code')}): "
                     "the last lines of stderr only; the rest stays with the data")
        lines.append((real_tail or "(nothing kept: the job has not failed)").rstrip())
    else:
        lines.append("==== no real run (yet)")
    return _done(args, data, "\n".join(lines))


# --- the export airlock ---------------------------------------------------------


def export(args) -> int:
    listing = _client().export(args.id)
    if listing.get("error"):
        return _done(args, listing, f"submission {args.id}: the export could not be read: {listing['error']}")
    if not listing.get("file_count"):
        state = "was purged" if listing.get("purged") else ("has no files" if listing["ended"] else "has not ended yet")
        return _done(args, listing, f"submission {args.id}: the export {state}")
    # names, sizes and hashes of the files reviewers have not released are theirs alone
    lines = [f"submission {args.id}: {listing['file_count']} export file(s), {listing['total_bytes']} bytes; "
             f"{listing['requested']} requested, {len(listing['files'])} released"]
    for f in listing["files"]:
        lines.append(f"  {'released' if f['released'] else 'expired '}  {f['size']:>12}  {f['sha256']}  {f['path']}")
    for r in listing["requests"]:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(r.get("counts", {}).items()))
        lines.append(f"  release request {r['id']}: {r['status']} ({counts}; {r['created_at']})")
    return _done(args, listing, "\n".join(lines))


def release(args) -> int:
    request = _client().release(args.id, args.justification)
    count = sum(request.get("counts", {}).values())
    text = (f"release request {request['id']} for submission {args.id} ({count} file(s)): {request['status']}.\n"
            f"Reviewers decide; you get an email. Then: m2d download {args.id} PATH")
    return _done(args, request, text)


def download(args) -> int:
    out = args.out or Path(args.path.rsplit("/", 1)[-1])
    result = _client().download(args.id, args.path, out)
    resumed = f", resumed at byte {result['resumed_from']}" if result["resumed_from"] else ""
    return _done(args, result, f"{result['out']}: {result['size']} bytes, sha256 {result['sha256']} "
                               f"matches the manifest{resumed}")


def provenance(args) -> int:
    chain = _client().provenance(args.id)
    lines = [f"submission {args.id}: provenance chain "
             + ("verified" if chain["verified"] else f"BROKEN at {chain['broken']}")]
    for record in chain["records"]:
        payload = ", ".join(f"{k}={v}" for k, v in record["payload"].items())
        lines.append(f"  {record['seq']:>3}  {record['at']}  {record['kind']:<12} {payload}")
    _done(args, chain, "\n".join(lines))
    return 0 if chain["verified"] else 1


def run(args) -> int:
    from . import local

    extra_env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {item!r} is not NAME=VALUE")
        extra_env[name] = value
    say = (lambda text: print(text, file=sys.stderr)) if args.json else (lambda text: print(text, flush=True))
    result = local.run(args.source, args.dataset, args.export, extra_env, mlruns=args.mlruns, say=say,
                       version=args.dataset_version, wanted_mode=args.mode, base_image=args.base_image,
                       stdout=sys.stderr if args.json else None)  # --json: stdout is the summary's alone
    for note in result.notes:
        print(f"m2d: note: {note}", file=sys.stderr)
    text = f"m2d: main.py exited with {result.exit_code}; outputs in {Path(args.export).resolve()}"
    summary = {"exit_code": result.exit_code, "export": str(Path(args.export).resolve()), "mode": result.mode,
               "mounts": result.mounts, "tracking_uri": result.tracking_uri,
               "python": str(result.python) if result.python else None,
               "image": str(result.image) if result.image else None,
               "dataset": str(result.dataset), "dataset_version": result.dataset_version}
    _done(args, summary, text)
    return result.exit_code


def check_export(args) -> int:
    """The disclosure report of a local export, against the twin's fingerprint index
    (or --index): what reviewers' report would say. Exit 3 when a file fails."""
    try:
        from .disclosure import __main__ as disclosure
        from .disclosure import index as disclosure_index
        from .disclosure.report import write_json
    except ImportError as e:
        return _fail(args, "missing_extra", f"check-export needs the disclosure extra ({e.name} is missing): "
                                            "pip install 'm2d[disclosure]'")
    from . import local

    index_dir = args.index
    if index_dir is None:
        version = twin.check_version(args.dataset_version or local.dataset_version())
        dataset = args.dataset or twin.ensure(local.twin_dir(), version)
        index_dir = local.cache_dir() / "disclosure-index" / (version if args.dataset is None else
                                                              hashlib.sha256(str(Path(dataset).resolve()).encode())
                                                              .hexdigest()[:16])
        disclosure_index.build(dataset, index_dir, log=lambda text: print(f"m2d: {text}", file=sys.stderr))
    report = disclosure.make_report(index_dir, args.source, args.train_count)
    if args.out:
        write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for f in report["files"]:
            print(f"{f['status'].upper():7} {f['path']}  ({f['type']}, {f['size']} bytes)")
            for c in f["checks"]:
                if c["status"] != "pass":
                    print(f"        {c['status']}: {c['name']}: {c['reason']}")
        counts = report["summary"]
        print(f"m2d: {counts['pass']} pass, {counts['review']} review, {counts['fail']} fail")
    return disclosure.EXIT_FAIL if report["summary"]["fail"] else 0


# --- output ----------------------------------------------------------------------


def _done(args, data: dict, text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _fail(args, code: str, message: str, prefix: str = "m2d: ") -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": code, "message": message}, indent=2))
    else:
        print(f"{prefix}{message}", file=sys.stderr)
    return 1


def _checked_dict(path, checked: archive.Checked) -> dict:
    return {"zip": str(path), "ok": True, "files": checked.files,
            "uncompressed_bytes": checked.uncompressed_bytes,
            "requirements": archive.requirement_lines(checked), "predict": checked.predict}


def _checked_text(path, checked: archive.Checked) -> str:
    requirements = ", ".join(archive.requirement_lines(checked)) or "(none)"
    predict = (f"m2d.toml's predict {checked.predict} (the disclosure report's membership test calls it)"
               if checked.predict else "no predict entry point (m2d.toml): reviewers get no membership test")
    return (f"OK: the platform would accept {path}: {checked.files} files, "
            f"{checked.uncompressed_bytes} bytes unpacked; requirements: {requirements}; {predict}")


def _summary(submission: dict) -> str:
    line = f"#{submission['id']:<5} {submission['status']:<12} {submission['filename']}  {submission['updated_at']}"
    if submission.get("exit_code") is not None:
        line += f"  exit code {submission['exit_code']}"
    if submission.get("reason"):
        line += f"  {submission['reason']}"
    return line


def _details(submission: dict) -> str:
    lines = [f"submission {submission['id']}: {submission['status']}",
             f"  file: {submission['filename']} (sha256 {submission['zip_sha256']})"]
    for key, label in (("slurm_job_id", "Slurm job"), ("dataset_version", "dataset version"),
                       ("exit_code", "exit code"), ("reason", "reason")):
        if submission.get(key) is not None:
            lines.append(f"  {label}: {submission[key]}")
    if submission.get("error"):
        lines.append("  error:\n" + "\n".join(f"    {line}" for line in submission["error"].splitlines()))
    lines.append("  history:")
    for event in submission.get("events", []):
        detail = f"  {event['detail']}" if event.get("detail") else ""
        lines.append(f"    {event['at']}  {event['status']}{detail}")
    return "\n".join(lines)


def _client():
    from .client import Client

    return Client(config.load())


# --- the command line --------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2d", description="The researcher's toolkit for the Model-to-Data Gateway.",
        epilog="Settings: m2d login stores the gateway URL and token in ~/.config/m2d/config.json; "
               "M2D_URL and M2D_TOKEN override it.")
    parser.add_argument("--version", action="version", version=f"m2d {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")

    def command(name, function, help, **kwargs):
        sub = commands.add_parser(name, help=help, description=kwargs.pop("description", help),
                                  parents=[output], **kwargs)
        sub.set_defaults(command=function)
        return sub

    sub = command("sample-data", sample_data, "write a synthetic CLaM sample (numpy and Pillow needed)")
    sub.add_argument("--out", required=True, type=Path, help="folder to create (must be absent or empty)")
    sub.add_argument("--cases", type=int, default=10, help="number of cases, in the published sample's "
                     "proportions of split, label and view (default 10, as the published sample)")
    sub.add_argument("--min-per-cell", type=int, default=twin.FLOOR, metavar="N",
                     help=f"then at least N cases of each label in each split, as in the dry run's twin, so "
                          f"that test-split scores (ROC AUC) are defined (default {twin.FLOOR}; 0: exactly --cases)")
    sub.add_argument("--size", default="128x160", help="image WIDTHxHEIGHT in pixels (default 128x160)")
    sub.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")

    sub = command("check", check, "check a zip with the platform's own rules")
    sub.add_argument("source", metavar="ZIP")

    sub = command("zip", zip_folder, "zip a project folder for submission, then check it",
                  description="Zip FOLDER's files so they sit at the zip's root, leaving out caches, "
                              "hidden files, .git and virtual environments; then check the zip.")
    sub.add_argument("source", metavar="FOLDER")
    sub.add_argument("-o", "--output", metavar="ZIP", help="where to write it (default ./FOLDERNAME.zip)")

    sub = command("login", login, "check and store the gateway URL and your API token")
    sub.add_argument("--url", required=True, help="the gateway, e.g. https://gateway.example.org")
    sub.add_argument("--token", required=True, help="your API token")

    sub = command("submit", submit, "upload a project folder or zip")
    sub.add_argument("source", metavar="FOLDER|ZIP")

    sub = command("status", status, "list your submissions, or show one")
    sub.add_argument("id", type=int, nargs="?", metavar="ID")

    command("usage", usage, "your Slurm account: usage this period against your limits")

    sub = command("wait", wait, "wait until a submission ends; exit 0 only if it completed")
    sub.add_argument("id", type=int, metavar="ID")
    sub.add_argument("--timeout", type=float, metavar="SECONDS", help="give up (exit 1) after this long")

    sub = command("cancel", cancel, "cancel a submission")
    sub.add_argument("id", type=int, metavar="ID")

    sub = command("logs", logs, "show a submission's logs: the dry run's whole log, the real run's tail")
    sub.add_argument("id", type=int, metavar="ID")

    sub = command("export", export, "a submission's export: how many files, and those reviewers released")
    sub.add_argument("id", type=int, metavar="ID")

    sub = command("release", release, "ask reviewers to release the export's files (those not yet requested)")
    sub.add_argument("id", type=int, metavar="ID")
    sub.add_argument("--justification", required=True,
                     help="which files you need, what they are and what you will do with them")

    sub = command("download", download, "download a released file, resuming a partial one; checks its sha256")
    sub.add_argument("id", type=int, metavar="ID")
    sub.add_argument("path", metavar="PATH", help="the export file, as m2d export lists it")
    sub.add_argument("--out", type=Path, metavar="FILE", help="where to write it (default ./BASENAME)")

    sub = command("provenance", provenance, "show a submission's hash-chained provenance; exit 1 if broken")
    sub.add_argument("id", type=int, metavar="ID")

    sub = command("check-export", check_export, "check a local export as the platform's disclosure report "
                  "would (needs m2d[disclosure]); exit 3 when a file fails",
                  description="Run the platform's disclosure checks (dataset content, near-duplicate images, "
                              "identifiers, tables, models) on an export folder, e.g. from m2d run on the twin, "
                              "against the twin dataset's fingerprint index (built once, cached). Exit 0 when "
                              "no file fails, 3 when one does.")
    sub.add_argument("source", metavar="DIR", type=Path)
    sub.add_argument("--index", type=Path, metavar="INDEX_DIR", help="a fingerprint index to check against "
                     "(default: the twin's, or --dataset's, built on first use)")
    sub.add_argument("--dataset", type=Path, help="index this dataset folder instead of the twin")
    sub.add_argument("--dataset-version", metavar="VERSION", help="whose twin (default: as m2d run)")
    sub.add_argument("--train-count", type=int, metavar="N", help="training cases (default: the index's)")
    sub.add_argument("--out", type=Path, metavar="REPORT.json", help="also write the report here")

    sub = command("run", run, "run a submission locally, as the platform would (Apptainer or virtualenv)",
                  description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("source", metavar="FOLDER|ZIP")
    sub.add_argument("--dataset", type=Path,
                     help="the dataset folder (e.g. from m2d sample-data); default: the dry run's synthetic twin, "
                          "with M2D_DRY_RUN=1")
    sub.add_argument("--dataset-version", metavar="VERSION",
                     help="whose twin to run on when --dataset is left out (default: $M2D_DATASET_VERSION, "
                          "else the platform's default)")
    sub.add_argument("--export", type=Path, default=Path("export"), help="the export folder (default ./export)")
    sub.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="set a variable for main.py (repeatable), e.g. --env EPOCHS=1")
    sub.add_argument("--mlruns", type=Path, default=Path("mlruns"),
                     help="local MLflow file store, used when MLFLOW_TRACKING_URI is unset (default ./mlruns)")
    sub.add_argument("--mode", choices=("apptainer", "venv"),
                     help="apptainer: the platform's sealed container; venv: a virtualenv with the same paths "
                          "(default: apptainer when it is on PATH)")
    sub.add_argument("--base-image", type=Path, metavar="SIF",
                     help="Apptainer mode: the platform's base image (default: $M2D_BASE_IMAGE, else built once "
                          "from the platform's definition into ~/.cache/m2d/images)")
    return parser
