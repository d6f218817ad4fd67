"""An archive that holds model files leaves as a copy with each model member sanitised.

A low-bit payload in a ``.pt`` inside ``models.zip`` is the same payload as in a
top-level ``model.pt`` (Song et al., CCS 2017), so an export archive (zip or npz,
tar, or a gzip/bz2/xz stream of one or of a model) that holds a PyTorch or
safetensors model is rewritten: the same member names in the same order, each
model member re-saved as sanitise.py re-saves a top-level model file (for the
released copy: safetensors bytes, floats rounded; for the rounded view that
predict loads: the member rounded in its own format), every other member's
bytes copied as they are. Archives inside it are rewritten the same way when
they hold a model (up to Limits.max_nesting deep) and copied as they are when
they do not. What is not a member is left behind: zip and member comments, zip
extra fields, bytes between or around members, tar pax records beyond those a
name or size needs; a compressed stream is compressed again without its file
name or time.

An archive with a model member that cannot be re-saved (pickled code, a whole
pickled object, ONNX, Keras/HDF5, a damaged checkpoint), a damaged or encrypted
member, or a bound hit (members, bytes of a member, bytes unpacked in all,
nesting, the report's seconds) is refused (MemberUnsanitisable, naming the
member): the report makes its ``sanitise`` check ``review``, and it leaves, if at
all, as written by the reviewers' decision, as a top-level model file does.

Nothing is unpickled or loaded here (sanitise.py reads tensors without
running anything); runs in the report job's image, on hostile input.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import mmap
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import sanitise, sniff
from .limits import Limits

ARCHIVE_TYPES = ("zip", "npz", "tar", "gzip", "bz2", "xz")  # sniff's types this rewrites
SUFFIX = {"zip": "zip", "npz": "zip", "tar": "tar", "gzip": "gz", "bz2": "bz2", "xz": "xz"}  # of the copy's name
UNSAVED_MODELS = ("onnx", "hdf5", "keras")  # model files sanitise cannot re-save: an archive holding one is reviewed
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
COMPRESS = {"gzip": lambda data: gzip.compress(data, mtime=0), "bz2": bz2.compress,
            "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ)}
OPEN = {"gzip": gzip.GzipFile, "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}
DAMAGED = (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError,
           KeyError, NotImplementedError, RuntimeError)  # (RuntimeError: an encrypted zip member)
KEY = "::"  # member path in the summary: "inner.zip::model.pt"; a tensor's "inner.zip::model.pt::fc.weight"
REASON_MEMBERS = 5


class MemberUnsanitisable(sanitise.Unsanitisable):
    """The archive cannot leave as a sanitised copy: ``member`` (the path of
    member names, outermost first; empty: the archive itself) says where."""

    def __init__(self, member: list[str], reason: str):
        super().__init__(reason)
        self.member = member


@dataclass
class _Context:
    model: Callable[[bytes, list[str]], bytes]
    limits: Limits
    tick: Callable[[], None]
    unpacked: int = 0
    replaced: list[list[str]] = field(default_factory=list)

    def read(self, stream, member: list[str]) -> bytes:
        out = bytearray()
        while block := stream.read(1 << 20):
            out += block
            self.unpacked += len(block)
            self.tick()
            if len(out) > self.limits.max_member_bytes:
                raise MemberUnsanitisable(member, f"it unpacks to more than {self.limits.max_member_bytes} bytes")
            if self.unpacked > self.limits.max_unpacked_bytes:
                raise MemberUnsanitisable(member, f"the archive unpacks to more than "
                                                  f"{self.limits.max_unpacked_bytes} bytes")
        return bytes(out)


def rewrite(data, out, model: Callable[[bytes, list[str]], bytes], limits: Limits = Limits(),
            tick: Callable[[], None] = lambda: None) -> list[list[str]]:
    """Write the archive ``data`` (bytes or an mmap, one of ARCHIVE_TYPES) to the
    file ``out`` with each model member's bytes replaced by ``model(its bytes,
    its member path)``; the member paths replaced (none: ``out`` holds an
    archive with nothing replaced, which the caller drops). MemberUnsanitisable
    when it cannot; ``tick`` may raise to stop it (the report's time bound)."""
    context = _Context(model, limits, tick)
    _archive(data, sniff.kind(data), out, context, 0, [])
    return context.replaced


def _archive(data, kind: str, out, context: _Context, nesting: int, path: list[str]) -> None:
    if nesting >= context.limits.max_nesting:
        raise MemberUnsanitisable(path, f"archives nested deeper than {context.limits.max_nesting}")
    try:
        if kind in ("zip", "npz"):
            _zip(data, out, context, nesting, path)
        elif kind == "tar":
            _tar(data, out, context, nesting, path)
        elif kind in COMPRESS:
            with OPEN[kind](fileobj=sniff.reader(data)) as stream:
                inner = context.read(stream, path)
            new = _member(inner, context, nesting, [*path, f"(the {kind} stream)"])
            out.write(COMPRESS[kind](inner if new is None else new))
        else:
            raise MemberUnsanitisable(path, f"a {kind}, not an archive this rewrites")
    except MemberUnsanitisable:
        raise
    except DAMAGED as e:
        raise MemberUnsanitisable(path, f"a damaged {kind}, not read whole ({type(e).__name__})") from None


def _member(body: bytes, context: _Context, nesting: int, path: list[str]) -> bytes | None:
    """A member's new bytes, or None when it is copied as it is."""
    kind = sniff.kind(body)
    if kind in sanitise.MODEL_TYPES:
        try:
            new = context.model(body, path)
        except MemberUnsanitisable:
            raise
        except sanitise.Unsanitisable as e:
            raise MemberUnsanitisable(path, e.reason) from None
        context.replaced.append(path)
        return new
    if kind in UNSAVED_MODELS:
        raise MemberUnsanitisable(path, f"a {kind} model, which cannot be re-saved as plain tensors")
    if kind not in ARCHIVE_TYPES:
        return None
    before = len(context.replaced)
    nested = io.BytesIO()
    _archive(body, kind, nested, context, nesting + 1, path)
    return nested.getvalue() if len(context.replaced) > before else None


def _zip(data, out, context: _Context, nesting: int, path: list[str]) -> None:
    with zipfile.ZipFile(sniff.reader(data)) as archive:
        infos = archive.infolist()
        if len(infos) > context.limits.max_members:
            raise MemberUnsanitisable(path, f"more than {context.limits.max_members} members")
        with zipfile.ZipFile(out, "w") as written:
            for info in infos:
                context.tick()
                member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                member.external_attr, member.create_system = info.external_attr, info.create_system
                member.compress_type = info.compress_type if info.compress_type in ZIP_METHODS else zipfile.ZIP_DEFLATED
                if info.is_dir():
                    written.writestr(member, b"")
                    continue
                where = [*path, info.filename]
                with archive.open(info) as stream:
                    body = context.read(stream, where)
                new = _member(body, context, nesting, where)
                written.writestr(member, body if new is None else new)


def _tar(data, out, context: _Context, nesting: int, path: list[str]) -> None:
    with tarfile.open(fileobj=sniff.reader(data), mode="r:") as archive, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as written:
        for count, info in enumerate(archive):
            if count >= context.limits.max_members:
                raise MemberUnsanitisable(path, f"more than {context.limits.max_members} members")
            context.tick()
            member = tarfile.TarInfo(info.name)
            for attr in ("mode", "mtime", "uid", "gid", "uname", "gname", "linkname", "devmajor", "devminor"):
                setattr(member, attr, getattr(info, attr))
            if not info.isfile():  # folders, links, devices: their header only (the report reviews links)
                member.type = info.type
                written.addfile(member)
                continue
            where = [*path, info.name]
            body = context.read(archive.extractfile(info), where)
            new = _member(body, context, nesting, where)
            body = body if new is None else new
            member.type, member.size = tarfile.REGTYPE, len(body)
            written.addfile(member, io.BytesIO(body))


# --- what the report job writes ---------------------------------------------------------


def sanitise_archive(data, target: Path, mantissa_bits: int, limits: Limits = Limits(),
                     tick: Callable[[], None] = lambda: None) -> dict:
    """Write the sanitised copy of the archive ``data`` to ``target``; its summary
    (sanitise's, over every model member, tensors named ``member::tensor``, with
    ``members``: each model member's own). MemberUnsanitisable when it cannot,
    or when it holds no model member sanitise re-saves (nothing is written then)."""
    summaries: dict[str, dict] = {}

    def model(body: bytes, member: list[str]) -> bytes:
        copy, summaries[KEY.join(member)] = sanitise.sanitised_bytes(body, mantissa_bits)
        return copy

    replaced = _write(data, Path(target), model, limits, tick)
    if not replaced:
        raise MemberUnsanitisable([], "it holds no PyTorch or safetensors model to re-save")
    summary = {"format": sniff.kind(data), "mantissa_bits": mantissa_bits, "members": {}, "tensors": 0,
               "float_values": 0, "max_abs_change": 0.0, "max_rel_change": 0.0, "left_out_count": 0,
               "integer_tensors": [], "sketch": {}, "tensor_changes": {}, "bytes": Path(target).stat().st_size}
    bits_total = bits_removed = 0
    for member, one in summaries.items():
        summary["members"][member] = {k: one[k] for k in ("format", "tensors", "float_values", "max_abs_change",
                                                          "max_rel_change", "fraction_bits_removed",
                                                          "left_out_count")}
        for k in ("tensors", "float_values", "left_out_count"):
            summary[k] += one[k]
        for k in ("max_abs_change", "max_rel_change"):
            summary[k] = max(summary[k], one[k])
        bits_total, bits_removed = bits_total + one["bits_total"], bits_removed + one["bits_removed"]
        summary["integer_tensors"] += [f"{member}{KEY}{name}" for name in one["integer_tensors"]]
        for k in ("sketch", "tensor_changes"):
            summary[k].update({f"{member}{KEY}{name}": value for name, value in one[k].items()})
    summary["integer_tensors"] = summary["integer_tensors"][:100]
    summary["fraction_bits_removed"] = bits_removed / bits_total if bits_total else 0
    return summary


def write_rounded_archive(data, target: Path, mantissa_bits: int, limits: Limits = Limits()) -> bool:
    """The archive ``data`` with each model member rounded in its own format
    (sanitise.rounded_bytes: what predict loads for the rounded view,
    rounded.py); whether it held one (False: nothing written). Refused
    (MemberUnsanitisable) exactly where sanitise_archive is."""
    return bool(_write(data, Path(target), lambda body, _member: sanitise.rounded_bytes(body, mantissa_bits),
                       limits, lambda: None))


def _write(data, target: Path, model, limits: Limits, tick) -> list[list[str]]:
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as out:
            replaced = rewrite(data, out, model, limits, tick)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if not replaced:
        partial.unlink()
        return []
    partial.replace(target)
    return replaced


def describe(member: list[str], shown: Callable[[str], str] = repr) -> str:
    """'member 'model.pt' of member 'inner.zip'' (``shown`` masks a name for a reason)."""
    parts = [part if part.startswith("(the ") else f"member {shown(part)}" for part in reversed(member)]
    return " of ".join(parts) or "the archive"


def check_archive(path: Path, sha256: str, report_dir: Path, mantissa_bits: int, limits: Limits = Limits(),
                  tick: Callable[[], None] = lambda: None, shown: Callable[[str], str] = repr
                  ) -> tuple[dict, dict | None]:
    """What the report job adds for one top-level archive that holds a model:
    the ``sanitise`` check and the entry's ``sanitised`` field (None when it is
    review), as sanitise.check_model does for a model file. The copy is
    ``sanitised/<sha256>.<zip|tar|gz|bz2|xz>`` under ``report_dir``. ``shown``
    masks a member's name for the reason."""
    folder = Path(report_dir) / sanitise.SANITISED_FOLDER
    folder.mkdir(exist_ok=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        kind = sniff.kind(data)
        name = f"{sanitise.SANITISED_FOLDER}/{sha256}.{SUFFIX.get(kind, 'bin')}"
        try:
            summary = sanitise_archive(data, Path(report_dir) / name, mantissa_bits, limits, tick)
        except MemberUnsanitisable as e:
            return {"name": "sanitise", "status": "review",
                    "reason": f"a model inside it cannot be re-saved as plain tensors, so the archive would leave "
                              f"as it is: {describe(e.member, shown)}: {e.reason}"}, None
    with open(Path(report_dir) / name, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    sanitised = {"name": name, "sha256": digest, "size": summary["bytes"],
                 **{k: summary[k] for k in ("format", "mantissa_bits", "tensors", "float_values", "max_abs_change",
                                            "max_rel_change", "fraction_bits_removed", "left_out_count",
                                            "integer_tensors", "sketch", "tensor_changes", "members")}}
    members = [describe(m.split(KEY), shown) for m in summary["members"]]
    reason = (f"released as a copy of the {kind} with its {len(members)} model member(s) re-saved as plain tensors "
              f"(safetensors under the same names), floats rounded to {mantissa_bits} mantissa bits: "
              f"{summary['fraction_bits_removed']:.0%} of their bits removed, no weight changed by more than "
              f"{summary['max_rel_change']:.2%}: {', '.join(members[:REASON_MEMBERS])}"
              + (f" and {len(members) - REASON_MEMBERS} more" if len(members) > REASON_MEMBERS else "")
              + "; every other member copied as it is (comments and extra fields left behind)")
    if summary["left_out_count"]:
        reason += f"; {summary['left_out_count']} values that are not tensors left out"
    return {"name": "sanitise", "status": "pass", "reason": reason}, sanitised
