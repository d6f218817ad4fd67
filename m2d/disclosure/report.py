"""The disclosure report of an export folder: every file pass, review or fail, with reasons.

Each file is read once from an fd opened beneath the export without following
any symlink, mapped read-only, typed by its bytes, then checked:
dataset-content (whole files and content-defined chunks, also after
decompression), near-duplicate-image, identifiers, table, model checks, and
unknown-format for what none of them understands. Archives (zip, npz, tar,
gzip/bz2/xz, PyTorch's zip, XLSX, Keras) are opened member by member, within
limits.Limits. With ``sanitise_bits`` (``--sanitise-bits N``) each top-level model
file (by content) is also re-saved as plain tensors, floats rounded to N
mantissa bits, into the report folder (sanitise.check_model): its entry
names the copy (``sanitised``) that leaves in its place, and its ``sanitise``
check says what was done, or is ``review`` with why it cannot be (then the
file would leave as written). A top-level archive that holds such a model (zip,
npz, tar, or a gzip/bz2/xz stream: archives.py) gets a copy too, with each
model member re-saved the same way under its own name and every other member
copied, or is ``review`` naming the member that cannot be. A reason never holds dataset content or an identifier value:
dataset files are named by number and type, identifiers by kind and place,
and an export name or header that holds an identifier is shown with it masked.
"""
from __future__ import annotations

import bisect
import bz2
import datetime
import gzip
import hashlib
import json
import lzma
import mmap
import os
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m2d.contract.names import escape

from . import archives, chunks, images, models, pickles, sanitise, sniff, tables
from .index import Index
from .limits import Budget, LimitExceeded, Limits

VERSION = 1
ORDER = {"pass": 0, "review": 1, "fail": 2}
PARAMS_PER_CASE = 100  # review a model with more parameters than this per training case
MAX_REASONS = 6  # per check and file; the rest are counted
MODEL_TYPES = {"pytorch-zip", "pytorch-legacy", "safetensors", "onnx", "hdf5", "keras"}
IMAGE_TYPES = {"png", "jpeg", "gif", "tiff", "bmp", "webp"}
ACRO_VERSION = "1.0.2"  # the ACRO release whose results.json shape --acro-out writes


@dataclass
class Finding:
    name: str
    status: str
    reason: str


@dataclass
class FileReport:
    path: str
    size: int = 0
    sha256: str = ""
    type: str = "binary"
    findings: list[Finding] = field(default_factory=list)
    ran: set[str] = field(default_factory=set)
    sanitised: dict | None = None  # the sanitised copy that leaves in its place (sanitise.check_model)
    model_members: list[str] = field(default_factory=list)  # where a model lies inside it (an archive)
    attack: dict | None = None  # the membership attack's AUC on the original and the rounded copy

    def add(self, name: str, status: str, reason: str) -> None:
        self.ran.add(name)
        self.findings.append(Finding(name, status, reason))

    def as_dict(self) -> dict:
        by_name: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_name.setdefault(f.name, []).append(f)
        checks = []
        for name in sorted(self.ran):
            found = by_name.get(name, [])
            worst = max((f.status for f in found), key=ORDER.get, default="pass")
            reasons = [f.reason for f in found if f.status == worst] or [PASS_REASONS.get(name, "nothing found")]
            more = len(reasons) - MAX_REASONS
            reason = "; ".join(reasons[:MAX_REASONS]) + (f"; and {more} more" if more > 0 else "")
            checks.append({"name": name, "status": worst, "reason": reason})
        status = max((c["status"] for c in checks), key=ORDER.get, default="pass")
        entry = {"path": self.path, "size": self.size, "sha256": self.sha256, "type": self.type,
                 "status": status, "checks": checks}
        if self.sanitised is not None:
            entry["sanitised"] = self.sanitised
        if self.attack is not None:
            entry["membership"] = self.attack
        if self.model_members:  # the release code treats it as a model file: a copy, a review, or refused
            entry["model_members"] = len(self.model_members)
        return entry


PASS_REASONS = {
    "dataset-content": "no dataset file or chunk of one found",
    "near-duplicate-image": "not near any dataset image",
    "identifiers": "no identifier value of the dataset found",
    "table": "no small, zero or dominated cells; not row-level",
    "model-parameters": "parameters within the site's limit per training case",
    "pickle-code": "only tensors and plain containers",
    "file-kind": "a regular file",
}


class Checker:
    def __init__(self, index: Index, limits: Limits = Limits(), train_count: int | None = None,
                 params_per_case: float = PARAMS_PER_CASE, sanitise_bits: int | None = None,
                 report_dir: str | os.PathLike | None = None, membership: tuple | None = None,
                 sanitised_metric: tuple[str, str, dict, dict | None] | None = None):
        # the membership check's (status, reason) (membership.status) and, optionally, the attack's
        # numbers on the original and the rounded copy (membership.attack), kept in the entry
        self.membership = membership
        # the sanitised-metric check's (status, reason, held_out: membership.compare) and the rounded
        # view's {path: sha256} predict was asked about (rounded.py; None: no view was made)
        self.sanitised_metric = sanitised_metric
        if sanitise_bits is not None and (report_dir is None or not 1 <= sanitise_bits <= 52):
            raise ValueError("--sanitise-bits: 1 to 52, and a report folder to write the copies to")
        self.index, self.limits, self.budget = index, limits, Budget(limits)
        self.sanitise_bits, self.report_dir = sanitise_bits, Path(report_dir) if report_dir else None
        self.train_count = train_count if train_count is not None else int(index.version.get("train_cases") or 0)
        self.params_per_case = params_per_case
        self.row_counts = index.row_counts()

    # --- the export folder ---------------------------------------------------------

    def run(self, export: str | os.PathLike) -> dict:
        files: list[FileReport] = []
        root = os.open(export, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            self._walk(root, b"", 0, files)
        finally:
            os.close(root)
        if self.membership is not None:
            self._membership(files)
        if self.sanitised_metric is not None:
            self._sanitised_metric(files)
        listed = [f.as_dict() for f in sorted(files, key=lambda f: f.path)]
        summary = {s: sum(1 for f in listed if f["status"] == s) for s in ORDER}
        return {"version": VERSION, "index_version": self.index.version["index_version"], "files": listed,
                "summary": summary}

    def _membership(self, files: list[FileReport]) -> None:
        """The membership check on each top-level model file (what predict loads),
        or, with none, on every top-level file: predict loaded its model from the
        export, whatever its format (a JSON of remembered labels is a model too)."""
        top = [f for f in files if "/" not in f.path and f.type not in ("folder", "unreadable", "empty")]
        targets = [f for f in top if f.type in MODEL_TYPES or f.type == "pickle" or f.model_members] or top
        status, reason, *numbers = self.membership
        for f in targets:
            f.add("membership", status, reason)
            if numbers:
                f.attack = numbers[0]

    def _sanitised_metric(self, files: list[FileReport]) -> None:
        """The sanitised-metric check on each file that leaves as its sanitised copy:
        the held-out metric of predict on the rounded view beside the original's,
        kept in its ``sanitised.held_out`` too; review where the view predict was
        asked about did not hold this file's bytes rounded."""
        status, reason, held_out, rounded = self.sanitised_metric
        for f in files:
            if f.sanitised is None:
                continue
            if rounded is not None and rounded.get(f.path) != f.sha256:
                f.add("sanitised-metric", "review", "predict was not asked about this file's rounded copy (the "
                                                    "rounded view holds other bytes or none for it): the released "
                                                    "model's held-out metric is unknown")
                continue
            f.add("sanitised-metric", status, reason)
            f.sanitised["held_out"] = held_out

    def _walk(self, dir_fd: int, prefix: bytes, depth: int, files: list[FileReport]) -> None:
        names = sorted(_names(dir_fd))
        for name in names:
            rel = prefix + name
            if len(files) >= self.limits.max_files:
                files.append(FileReport(escape(prefix or b"."), type="folder"))
                files[-1].add("limits", "fail", f"more than {self.limits.max_files} files in the export: "
                                                "the rest were not checked")
                return
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as e:
                report = FileReport(escape(rel), type="unreadable")
                report.add("file-kind", "fail", f"not read: {e.strerror}")
                files.append(report)
                continue
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 > self.limits.max_depth:
                    report = FileReport(escape(rel), type="folder")
                    report.add("limits", "fail", f"folders deeper than {self.limits.max_depth}: not checked")
                    files.append(report)
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                except OSError as e:
                    report = FileReport(escape(rel), type="folder")
                    report.add("file-kind", "fail", f"folder not opened: {e.strerror}")
                    files.append(report)
                    continue
                try:
                    self._walk(fd, rel + b"/", depth + 1, files)
                finally:
                    os.close(fd)
                continue
            files.append(self._check_entry(dir_fd, name, rel, info))

    def _check_entry(self, dir_fd: int, name: bytes, rel: bytes, info: os.stat_result) -> FileReport:
        report = FileReport(escape(rel), size=info.st_size)
        self._check_name(report, rel)
        if not stat.S_ISREG(info.st_mode):
            report.type = _kind_of(info)
            report.add("file-kind", "fail", f"{report.type}: never followed or read, cannot be released")
            return report
        if info.st_nlink > 1:
            report.type = "hard link"
            report.add("file-kind", "fail", f"a file with {info.st_nlink} links: never read, cannot be released")
            return report
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            report.add("file-kind", "fail", f"not opened: {e.strerror}")
            return report
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                report.add("file-kind", "fail", "changed while it was checked: not read")
                return report
            report.ran.add("file-kind")
            report.size = opened.st_size
            if not opened.st_size:
                report.type = "empty"
                return report
            if opened.st_size > self.limits.max_file_bytes:
                report.add("limits", "fail", f"over {self.limits.max_file_bytes} bytes: not checked")
                return report
            with mmap.mmap(fd, opened.st_size, access=mmap.ACCESS_READ) as data:
                try:
                    report.sha256 = _sha256(data, self.budget.tick)
                    report.type = self._inspect(report, data, "", 0, scanned=False)
                    if self.sanitise_bits is not None and report.type in MODEL_TYPES:
                        self._sanitise(report, fd)
                    elif self.sanitise_bits is not None and report.model_members:
                        self._sanitise_archive(report, fd)
                except LimitExceeded as e:
                    report.add("limits", "fail", f"not fully checked: {e}")
                except MemoryError:
                    report.add("limits", "fail", "not fully checked: out of memory")
                except Exception as e:  # a hostile file must not stop the other files' checks
                    report.add("limits", "fail", f"not fully checked: the checker failed on it ({type(e).__name__})")
        finally:
            os.close(fd)
        return report

    def _sanitise(self, report: FileReport, fd: int) -> None:
        """The released copy of a model file (the fd opened beneath the export,
        read again through /proc: no path is followed twice)."""
        self.budget.tick()
        try:
            check, report.sanitised = sanitise.check_model(Path(f"/proc/self/fd/{fd}"), report.sha256,
                                                           self.report_dir, self.sanitise_bits)
        except MemoryError:
            check = {"status": "review", "reason": "cannot be re-saved as plain tensors, so it would leave as it "
                                                   "is: out of memory"}
        except Exception as e:  # noqa: BLE001 - a hostile file must not stop the report
            check = {"status": "review", "reason": "cannot be re-saved as plain tensors, so it would leave as it "
                                                   f"is: the sanitiser failed on it ({type(e).__name__})"}
        report.add("sanitise", check["status"], self._masked(check["reason"]))

    def _sanitise_archive(self, report: FileReport, fd: int) -> None:
        """The released copy of an archive that holds a model (archives.py)."""
        self.budget.tick()
        if report.type not in archives.ARCHIVE_TYPES:
            report.add("sanitise", "review", f"a model inside a {report.type} ({report.model_members[0]}) is not "
                                             "re-saved: it would leave as it is")
            return
        try:
            check, report.sanitised = archives.check_archive(
                Path(f"/proc/self/fd/{fd}"), report.sha256, self.report_dir, self.sanitise_bits, self.limits,
                self.budget.tick, lambda name: self._mask(name, 60))
        except LimitExceeded:
            raise
        except MemoryError:
            check = {"status": "review", "reason": "a model inside it cannot be re-saved as plain tensors, so the "
                                                   "archive would leave as it is: out of memory"}
        except Exception as e:  # noqa: BLE001 - a hostile archive must not stop the report
            check = {"status": "review", "reason": "a model inside it cannot be re-saved as plain tensors, so the "
                                                   f"archive would leave as it is: the sanitiser failed on it "
                                                   f"({type(e).__name__})"}
        report.add("sanitise", check["status"], self._masked(check["reason"]))

    def _masked(self, text: str) -> str:
        """A reason with any identifier value of the dataset in it masked (a pickle's
        names, a member's name: the export's own words)."""
        for f in sorted(self.index.identifiers.find_in_text(text), key=lambda f: -f.start):
            text = text[:f.start] + "[identifier]" + text[f.end:]
        return text

    def _check_name(self, report: FileReport, rel: bytes) -> None:
        found = self.index.identifiers.find_in_text(rel.decode("utf-8", "surrogateescape"))
        for f in found:
            report.add("identifiers", "fail", f"its name holds {f.kind} of the dataset")

    # --- one file or member ----------------------------------------------------------

    def _inspect(self, report: FileReport, data, where: str, nesting: int, scanned: bool) -> str:
        """Check ``data`` (a file or a member ``where``) into ``report``; its type.
        ``scanned``: its bytes lie as they are in what was already scanned for content."""
        at = f" in {where}" if where else ""
        type_ = sniff.kind(data)
        self.budget.tick()
        if where and type_ in MODEL_TYPES:
            report.model_members.append(where)
        self._content(report, data, at, scanned)
        if type_ in IMAGE_TYPES or type_ == "npy":
            self._image(report, data, type_, at)
        if sniff.is_text(type_):
            self._text(report, data, type_, at)
        elif not scanned:
            for offset, kind in self.index.identifiers.find_in_binary(data, tick=self.budget.tick)[:100]:
                report.add("identifiers", "fail", f"{kind} of the dataset at byte {offset}{at}")
            report.ran.add("identifiers")
        if type_ in ("zip", "npz", "pytorch-zip", "keras", "xlsx", "tar", "gzip", "bz2", "xz"):
            if nesting >= self.limits.max_nesting:
                raise LimitExceeded(f"archives nested deeper than {self.limits.max_nesting}{at}")
            try:
                if type_ == "tar":
                    self._tar(report, data, where, nesting)
                elif type_ in ("gzip", "bz2", "xz"):
                    inner = self._decompress(data, type_, at)
                    self._inspect(report, inner, _join(where, f"the {type_} stream"), nesting + 1, scanned=False)
                else:
                    self._zip(report, data, type_, where, nesting)
            except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError,
                    ValueError, KeyError, NotImplementedError, RuntimeError) as e:
                report.add("unknown-format", "review", f"a damaged {type_}{at}, not fully read ({type(e).__name__})")
        if type_ in ("pytorch-legacy", "pickle", "safetensors", "onnx", "hdf5"):
            self._model_file(report, data, type_, at)
        if type_ == "npy":
            self._array(report, data, at)
        if type_ == "binary":
            report.add("unknown-format", "review", f"unknown format{at}: {sniff.describe(data, 'binary')}")
        return type_

    def _content(self, report: FileReport, data, at: str, scanned: bool) -> None:
        report.ran.add("dataset-content")
        whole = self.index.whole.get(_sha256(data)) if at else self.index.whole.get(report.sha256)
        if whole is not None:
            report.add("dataset-content", "fail", f"is {self.index.describe(whole)}{at}, byte for byte")
            return
        if scanned:
            return
        for m in chunks.find(data, self.index.chunk_keys, self.index.chunk_refs, self.budget.tick):
            report.add("dataset-content", "fail",
                       f"{m.chunks} chunk(s), {m.nbytes} bytes, of {self.index.describe(m.dataset_file)} at bytes "
                       f"{m.first_offset}..{m.last_offset}{at}")

    def _image(self, report: FileReport, data, type_: str, at: str) -> None:
        phash = images.phash_of(data, type_, self.limits.max_image_pixels)
        if phash is None:
            return
        self._near(report, phash, f"the {type_} image{at}")

    def _near(self, report: FileReport, phash: int, what: str) -> None:
        report.ran.add("near-duplicate-image")
        near = images.nearest(phash, self.index.phashes, self.index.phash_refs)
        if near:
            number, distance = near
            report.add("near-duplicate-image", "fail", f"{what} is a copy of {self.index.describe(number)}: perceptual "
                                                       f"hash {distance} of {images.BITS} bits away (at most {images.NEAR})")

    def _array(self, report: FileReport, data, at: str) -> None:
        arr = images.read_npy(data, self.limits.max_member_bytes)
        if arr is None:
            report.add("unknown-format", "review", f"an NPY array{at} that is not plain numbers, or too large to read")
        elif images.array_image(arr) is None:
            report.add("unknown-format", "review", f"an array{at} of shape {arr.shape}, {arr.dtype}: "
                                                   "a reviewer judges whether it is row-level data")

    def _text(self, report: FileReport, data, type_: str, at: str) -> None:
        report.ran.add("identifiers")
        if len(data) > self.limits.max_text_bytes:
            raise LimitExceeded(f"text over {self.limits.max_text_bytes} bytes{at}")
        text = bytes(data).decode("utf-8", "replace")
        ids = self.index.identifiers
        if type_ == "csv":
            sheet = tables.read_csv(text, self.limits.max_table_cells)
            self._sheet(report, sheet, at)
            if any(f.name == "identifiers" and f.status == "fail" for f in report.findings):
                return
            # not found in the cells read: the rest (past a cell bound or a malformed row) as text
        found = ids.find_in_text(text)
        if found:
            lines = _line_starts(text)
            for f in found[:100]:
                line = _line_of(lines, f.start)
                report.add("identifiers", "fail", f"{f.kind} of the dataset at line {line}, "
                                                  f"column {f.start - lines[line - 1] + 1}{at}")

    def _sheet(self, report: FileReport, sheet: tables.Sheet, at: str) -> None:
        ids = self.index.identifiers
        header = sheet.rows[0] if sheet.rows else []
        in_sheet = f" of sheet {self._mask(sheet.name)}" if sheet.name else ""

        def cell_name(row: int, col: int) -> str:
            title = self._mask(header[col]) if col < len(header) and header[col].strip() else ""
            return f"line {row}, column {col + 1}" + (f" ({title})" if title else "")

        hits = 0
        for i, row in enumerate(sheet.rows, start=1):
            for j, cell in enumerate(row):
                for f in ids.find_in_text(cell):
                    hits += 1
                    if hits <= 100:
                        report.add("identifiers", "fail", f"{f.kind} of the dataset at {cell_name(i, j)}{in_sheet}{at}")
        report.ran.add("identifiers")
        report.ran.add("table")
        for status, reason in tables.check(sheet, self.row_counts, cell_name):
            report.add("table", status, f"{reason}{in_sheet}{at}")

    def _mask(self, text: str, most: int = 40) -> str:
        """An export's own text (a header, a member's name) fit for a reason: identifier
        values masked, escaped, shortened."""
        shown = escape(self._masked(text).encode("utf-8", "surrogateescape"))
        return repr(shown[:most] + ("..." if len(shown) > most else ""))

    # --- containers ------------------------------------------------------------------

    def _read_limited(self, stream, at: str) -> bytes:
        out = bytearray()
        while True:
            block = stream.read(1 << 20)
            if not block:
                return bytes(out)
            out += block
            self.budget.spend(len(block))
            if len(out) > self.limits.max_member_bytes:
                raise LimitExceeded(f"a member or stream unpacking to more than {self.limits.max_member_bytes} bytes{at}")

    def _decompress(self, data, type_: str, at: str) -> bytes:
        opener = {"gzip": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}[type_]
        with opener(fileobj=sniff.reader(data)) as stream:
            return self._read_limited(stream, at)

    def _zip(self, report: FileReport, data, type_: str, where: str, nesting: int) -> None:
        with zipfile.ZipFile(sniff.reader(data)) as z:
            infos = z.infolist()
            if len(infos) > self.limits.max_members:
                raise LimitExceeded(f"more than {self.limits.max_members} members{_at(where)}")

            def read_member(info: zipfile.ZipInfo) -> bytes:
                with z.open(info) as stream:
                    return self._read_limited(stream, _at(_join(where, self._mask(info.filename))))

            if type_ == "xlsx":
                try:
                    sheets = tables.read_xlsx(data, self.limits.max_table_cells, self.limits.max_member_bytes)
                except Exception as e:  # openpyxl raises many kinds on a malformed workbook
                    report.add("unknown-format", "review", f"a workbook{_at(where)} that could not be read "
                                                           f"({type(e).__name__})")
                    sheets = []
                for sheet in sheets:
                    self._sheet(report, sheet, _at(where))
            if type_ == "pytorch-zip":
                self._model(report, models.torch_zip(z, read_member), _at(where))
            if type_ == "keras":
                weights = [i for i in infos if i.filename.endswith(".h5")]
                size = sum(i.file_size for i in weights)
                self._model(report, models.ModelFacts("keras", parameters=size // 4, estimated=True), _at(where))
            for info in infos:
                if info.is_dir():
                    continue
                self.budget.tick()
                self._check_member_name(report, info.filename, where)
                member = _join(where, f"member {self._mask(info.filename)}")
                body = read_member(info)
                stored = info.compress_type == zipfile.ZIP_STORED
                if type_ == "pytorch-zip":  # tensors' bytes and data.pkl: read above as the model
                    self._content(report, body, _at(member), stored)
                else:
                    self._inspect(report, body, member, nesting + 1, scanned=stored)

    def _tar(self, report: FileReport, data, where: str, nesting: int) -> None:
        with tarfile.open(fileobj=sniff.reader(data), mode="r:") as t:
            for count, member in enumerate(t):
                if count >= self.limits.max_members:
                    raise LimitExceeded(f"more than {self.limits.max_members} members{_at(where)}")
                self.budget.tick()
                self._check_member_name(report, member.name, where)
                name = f"member {self._mask(member.name)}"
                if member.isdir():
                    continue
                if not member.isfile():
                    report.add("unknown-format", "review", f"{name}{_at(where)} is a link or device entry")
                    continue
                stream = t.extractfile(member)
                body = self._read_limited(stream, _at(_join(where, name)))
                self._inspect(report, body, _join(where, name), nesting + 1, scanned=True)

    def _check_member_name(self, report: FileReport, name: str, where: str) -> None:
        for f in self.index.identifiers.find_in_text(name):
            report.add("identifiers", "fail", f"a member's name holds {f.kind} of the dataset{_at(where)}")

    # --- models ----------------------------------------------------------------------

    def _model_file(self, report: FileReport, data, type_: str, at: str) -> None:
        try:
            if type_ == "pytorch-legacy":
                model = models.torch_legacy(data)
            elif type_ == "pickle":
                facts = pickles.read(data, max_ops=self.limits.max_pickle_ops)
                model = models.ModelFacts("pickle", pickle=facts, strings=facts.strings)
                model.parameters = sum(int(np.prod(t.shape, dtype=np.int64)) for t in facts.tensors)
            elif type_ == "safetensors":
                model = models.safetensors(data)
            elif type_ == "onnx":
                model = models.onnx(data)
            else:
                model = models.hdf5(data)
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as e:
            report.add("unknown-format", "review", f"a {type_} file{at} that could not be read ({type(e).__name__})")
            return
        self._model(report, model, at)

    def _model(self, report: FileReport, model: models.ModelFacts, at: str) -> None:
        if model.pickle is not None:
            report.ran.add("pickle-code")
            p = model.pickle
            if p.error:
                report.add("pickle-code", "fail", f"{p.error}{at}: torch could not load it either, or it hides "
                                                  "something; not released as it is")
            code, library = p.code(), p.library()
            if code:
                report.add("pickle-code", "fail", f"loading it would import and may call {len(code)} name(s) beyond "
                                                  f"tensors and plain containers{at}: "
                                                  f"{', '.join(self._mask(c, 60) for c in code[:5])}")
            if library:
                report.add("pickle-code", "review", f"a whole pickled object, not a state dict{at}: "
                                                    f"{', '.join(self._mask(c, 60) for c in library[:5])}")
        ids = self.index.identifiers
        for s in model.strings[:200_000]:
            for f in ids.find_in_text(s):
                report.add("identifiers", "fail", f"{f.kind} of the dataset in a string of the {model.format} "
                                                  f"structure{at}")
                break
        for name, arr in model.image_tensors:
            image = images.array_image(arr)
            if image is not None:
                self._near(report, images._hash(image), f"{name}{at}")
        if model.format in MODEL_TYPES or model.parameters:
            report.ran.add("model-parameters")
            about = "about " if model.estimated else ""
            if self.train_count <= 0:
                report.add("model-parameters", "review", f"{about}{model.parameters} parameters{at}; the number of "
                                                         "training cases is unknown")
            else:
                ratio = model.parameters / self.train_count
                status = "review" if ratio > self.params_per_case else "pass"
                report.add("model-parameters", status,
                           f"{about}{model.parameters} parameters{at} for {self.train_count} training cases: "
                           f"{ratio:.0f} per case (review above {self.params_per_case:g}): enough to memorise "
                           f"cases" if status == "review" else
                           f"{about}{model.parameters} parameters{at} for {self.train_count} training cases")


# --- helpers ---------------------------------------------------------------------------


def _names(dir_fd: int) -> list[bytes]:
    with os.scandir(dir_fd) as it:
        return [os.fsencode(e.name) for e in it]


def _kind_of(info: os.stat_result) -> str:
    mode = info.st_mode
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _sha256(data, tick=None) -> str:
    h = hashlib.sha256()
    with memoryview(data) as view:
        for i in range(0, len(view), 1 << 24):
            h.update(view[i:i + (1 << 24)])
            if tick:
                tick()
    return h.hexdigest()


def _join(where: str, part: str) -> str:
    return f"{part} of {where}" if where else part


def _at(where: str) -> str:
    return f" in {where}" if where else ""


def _line_starts(text: str) -> list[int]:
    starts = [0]
    pos = text.find("\n")
    while pos >= 0:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    return starts


def _line_of(starts: list[int], offset: int) -> int:
    return bisect.bisect_right(starts, offset)


# --- writing ---------------------------------------------------------------------------


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomically: if ``path`` exists, it is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.chmod(0o644)
    tmp.rename(path)


def acro_results(report: dict) -> dict:
    """The report in ACRO's results.json shape (one "custom" output per file), for SACRO-Viewer."""
    now = datetime.datetime.now().isoformat()
    results = {}
    for i, f in enumerate(report["files"]):
        comments = [f"{c['name']}: {c['status']}: {c['reason']}" for c in f["checks"]]
        results[f"output_{i}"] = {
            "uid": f"output_{i}", "status": f["status"], "type": "custom",
            "properties": {"method": "m2d.disclosure", "type": f["type"], "size": f["size"], "sha256": f["sha256"]},
            "files": [{"name": f["path"], "sdc": {}}], "outcome": {}, "command": "python -m m2d.disclosure report",
            "summary": f"{f['status']}; " + "; ".join(f"{c['name']} {c['status']}" for c in f["checks"]),
            "timestamp": now, "comments": comments, "exception": "", "fair": {},
        }
    return {"version": ACRO_VERSION,
            "tool": {"@type": "SoftwareApplication", "name": "m2d.disclosure (ACRO's results shape)",
                     "version": str(VERSION)},
            "results": results}
