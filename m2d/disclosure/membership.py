"""Membership inference on a submission's model: a loss-threshold attack (issue 23, Models).

Standard library only: ``predict`` below runs in the submission's own image,
which may lack numpy. Three steps of the sealed report job
(singularity/disclosure.sbatch.j2), each in its own container:

1. ``plan`` (the checker's image, trusted): which images are asked about, from
   clam-details-image.csv: per split at most ``max_images``, chosen
   deterministically (by a hash of the image path), with their label and case.
2. ``predict`` (the submission's image: the researcher's code, hostile): imports
   the entry point m2d.toml declares, calls ``predict(export_dir, images)`` and
   writes what it returned to scratch. It sees the plan's paths, never labels
   it could not read itself; no network; the export read-only.
3. ``evaluate`` (the checker's image, trusted, in the report step): reads that
   output with bounds (size, types, length) and computes everything from the
   plan it made itself: each image's binary cross-entropy against CaseLabel,
   the attack's AUC (train = members, test = non-members, lower loss = member,
   ranked by the probability of the true label, which the loss's clip does not
   tie; ties averaged: sacroml's metric on the same scores), the held-out
   metric (test AUC and accuracy at 0.5), the training cases whose loss lies
   furthest below the test losses' median. The researcher's code never computes its own verdict: it could only
   lie through its predictions, which is what is being tested anyway.

``status`` turns a result into the ``membership`` check: AUC above the fail
threshold fails, above the review threshold is reviewed, too few cases on a
side or no usable predictions are reviewed (never passed). Where predict also
ran on the export as released (rounded.py: the model rounded as its sanitised
copy is), the attack is run on those predictions too, and both AUCs are kept
(``attack``): the copy is what leaves, the original is what was trained.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import os
import sys
import traceback

PLAN_VERSION = 1
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # what predict may write; more is not read
MAX_ERROR_CHARS = 300
WORST = 5  # training cases named in the reason
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] for the loss
LABELS = {"benign": 0, "malignant": 1}
IMAGE_CSV = "clam-details-image.csv"


class BadOutput(ValueError):
    """What predict wrote cannot be used: the check is review, with this as the reason."""


# --- 1. the plan (trusted) -----------------------------------------------------------


def plan(dataset: str, max_images: int, mount: str = "/mnt/dataset") -> dict:
    """The images to predict: per split at most ``max_images``, the same ones on
    every run (ordered by the sha256 of their path), with label and case."""
    with open(os.path.join(dataset, IMAGE_CSV), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    chosen = []
    for split in ("train", "test"):
        rows_of = [r for r in rows if r.get("Split") == split and r.get("CaseLabel") in LABELS and r.get("ImagePath")]
        rows_of.sort(key=lambda r: hashlib.sha256(r["ImagePath"].encode()).hexdigest())
        for r in rows_of[:max_images]:
            chosen.append({"path": f"{mount.rstrip('/')}/{r['ImagePath']}", "split": split,
                           "label": LABELS[r["CaseLabel"]], "case": r.get("CaseName") or r["ImagePath"]})
    return {"version": PLAN_VERSION, "images": chosen}


# --- 2. predict (the researcher's code) -------------------------------------------------


def predict(plan_path: str, code: str, entry: str, export: str, out: str) -> int:
    """Call the entry point on the plan's images; write ``{"predictions": [...]}``
    or ``{"error": "..."}`` to ``out``. 0 when it returned, 1 when it raised."""
    with open(plan_path, encoding="utf-8") as f:
        images = [item["path"] for item in json.load(f)["images"]]
    try:
        module_name, function_name = entry.split(":")
        sys.path.insert(0, code)
        function = getattr(importlib.import_module(module_name), function_name)
        returned = function(export, list(images))
        values = [_plain(v) for v in returned]
        text = json.dumps({"predictions": values})
        status = 0
    except BaseException as e:  # noqa: BLE001 - whatever the code raises (SystemExit too) is the answer
        last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
        where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
        text = json.dumps({"error": f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS] + where})
        status = 1
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return status


def _plain(value):
    """A number as JSON can carry it (numpy scalars, 0-d tensors), else its type name."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else repr(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return type(value).__name__
    return number if math.isfinite(number) else repr(number)


# --- 3. evaluate (trusted) --------------------------------------------------------------


def read_predictions(raw: bytes | None, expected: int) -> list[float]:
    """The predictions in what the predict step wrote, checked: a JSON object
    with a list of ``expected`` numbers in [0, 1]. BadOutput says why not."""
    if raw is None:
        raise BadOutput("the prediction step wrote nothing")
    if len(raw) > MAX_OUTPUT_BYTES:
        raise BadOutput(f"the prediction step wrote more than {MAX_OUTPUT_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))  # (NaN and Infinity parse as floats: refused below)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadOutput(f"the prediction step's output is not JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise BadOutput("the prediction step's output is not a JSON object")
    if "error" in data:
        error = data["error"] if isinstance(data["error"], str) else type(data["error"]).__name__
        raise BadOutput(f"predict raised {_clean(error)}")
    values = data.get("predictions")
    if not isinstance(values, list):
        raise BadOutput("predict returned no list")
    if len(values) != expected:
        raise BadOutput(f"predict returned {len(values)} values for {expected} images")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadOutput(f"predict's value {i + 1} is not a number ({_clean(repr(v))[:40]})")
        if not 0.0 <= v <= 1.0:
            raise BadOutput(f"predict's value {i + 1} is {v:g}, not a probability in [0, 1]")
    return [float(v) for v in values]


def _clean(text: str) -> str:
    """The code's own words, fit for a reason: printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_ERROR_CHARS]


def loss(p: float, label: int) -> float:
    """Binary cross-entropy of probability ``p`` (of malignant) against ``label``."""
    p = min(max(p, EPS), 1.0 - EPS)
    return -math.log(p) if label == 1 else -math.log(1.0 - p)


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half: the
    Mann-Whitney U by ranks (ties get their average rank)."""
    if not positives or not negatives:
        raise ValueError("an AUC needs both sides")
    scored = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        average = (i + 1 + j) / 2  # ranks i+1 .. j
        rank_sum += average * sum(1 for k in range(i, j) if scored[k][1])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def evaluate(the_plan: dict, predictions: list[float]) -> dict:
    """The attack and the held-out metric from the plan and the predictions."""
    images = the_plan["images"]
    losses = [loss(p, item["label"]) for p, item in zip(predictions, images)]
    train = [(item, l_) for item, l_ in zip(images, losses) if item["split"] == "train"]
    test = [(item, l_, p) for item, l_, p in zip(images, losses, predictions) if item["split"] == "test"]
    result = {"members": len(train), "non_members": len(test),
              "member_cases": len({item["case"] for item, _ in train}),
              "non_member_cases": len({item["case"] for item, _, _ in test})}
    if not train or not test:
        return result
    # a member is told by a low loss. Scored by the probability given to the true label, which
    # orders records as the loss does but without its clip (EPS): p = 0 and p = 1e-9 of a
    # malignant image are told apart, as SACRO-ML's loss (1 - that probability) tells them
    # (tests/data/sacroml/oracle.json: its AUC on the same predictions, equal to ours)
    truth = [p if item["label"] == 1 else 1.0 - p for item, p in zip(images, predictions)]
    result["auc"] = auc([t for t, item in zip(truth, images) if item["split"] == "train"],
                        [t for t, item in zip(truth, images) if item["split"] == "test"])
    test_labels = [item["label"] for item, _, _ in test]
    result["test_accuracy"] = sum((p >= 0.5) == (y == 1) for (_, _, p), y in zip(test, test_labels)) / len(test)
    if 0 < sum(test_labels) < len(test_labels):
        result["test_auc"] = auc([p for (_, _, p), y in zip(test, test_labels) if y == 1],
                                 [p for (_, _, p), y in zip(test, test_labels) if y == 0])
    median = _median([l_ for _, l_, _ in test])
    below: dict[str, float] = {}
    for item, l_ in train:
        margin = median - l_
        if margin > 0:
            below[item["case"]] = max(margin, below.get(item["case"], 0.0))
    result["worst_cases"] = [case for case, _ in sorted(below.items(), key=lambda kv: (-kv[1], kv[0]))[:WORST]]
    result["test_median_loss"] = median
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run(the_plan: dict, raw: bytes | None, exit_code: int | None, seconds: int | None = None) -> dict:
    """The result the report step keeps: ``evaluate``'s, or ``{"error": why}``."""
    if exit_code in (124, 137):
        return {"error": f"predict did not finish within its time limit{f' of {seconds} s' if seconds else ''}"}
    try:
        predictions = read_predictions(raw, len(the_plan["images"]))
    except BadOutput as e:
        if exit_code not in (None, 0, 1):
            return {"error": f"the prediction step ended with exit code {exit_code}: {e}"}
        return {"error": str(e)}
    return evaluate(the_plan, predictions)


# --- the check --------------------------------------------------------------------------


def status(result: dict, fail_auc: float, review_auc: float, min_cases: int,
           rounded: dict | None = None) -> tuple[str, str]:
    """The ``membership`` check of a model file: (status, reason). The reason
    names the worst training cases: reviewers read it, owners get counts only.
    ``rounded``: ``run``'s result of predict on the export as released (the
    rounded view), whose attack AUC the reason gives beside the original's.

    The status follows the larger of the two AUCs. The copy is what leaves,
    so its AUC is the risk that matters, but predict is the researcher's code
    and may tell the rounded view from the original (zeroed low bits) and
    answer differently there; rounding 16 of 24 mantissa bits does not undo
    memorisation, so a copy that scores far lower than its original means
    predict behaves differently, not that the copy forgot. Taking the larger
    keeps such a predict from lowering the verdict, and costs an honest model
    nothing (its two AUCs agree)."""
    if "error" in result:
        return "review", f"membership inference not done: {result['error']}; a reviewer judges the model without it"
    counts = (f"{result['members']} member images ({result['member_cases']} cases, Split=train) and "
              f"{result['non_members']} non-member images ({result['non_member_cases']} cases, Split=test)")
    if min(result["member_cases"], result["non_member_cases"]) < min_cases or "auc" not in result:
        return "review", f"too few cases for a membership attack: {counts}, at least {min_cases} cases a side needed"
    held_out = f"held-out accuracy at 0.5 {result['test_accuracy']:.3f}"
    if "test_auc" in result:
        held_out = f"held-out AUC {result['test_auc']:.3f}, " + held_out
    worst = ", ".join(result.get("worst_cases") or []) or "none below the test losses' median"
    value, on_copy = result["auc"], ""
    if rounded is not None and "auc" in rounded:
        value = max(value, rounded["auc"])
        on_copy = (f"; on the released (rounded) copy AUC {rounded['auc']:.3f} (the status follows the larger "
                   f"of the two)")
    elif rounded is not None:
        on_copy = f"; not measured on the released (rounded) copy: {rounded.get('error', 'no AUC')}"
    if value > fail_auc:
        verdict, word = "fail", f"above {fail_auc:g}: the model tells its training cases apart"
    elif value > review_auc:
        verdict, word = "review", f"above {review_auc:g}"
    else:
        verdict, word = "pass", f"at most {review_auc:g}"
    return verdict, (f"loss-threshold attack AUC {result['auc']:.3f} as written{on_copy} ({word}); {held_out}; "
                     f"{counts}; training cases furthest below the test losses' median: {worst}")


def attack(original: dict, rounded: dict | None) -> dict:
    """The attack's numbers on the model as written and, where predict ran on
    the export as released, on its rounded copy: the report entry's
    ``membership`` field (reviewers read both; the status is ``status``'s)."""
    def numbers(result: dict) -> dict:
        if "error" in result:
            return {"error": result["error"]}
        return {k: result[k] for k in ("auc", "members", "non_members", "member_cases", "non_member_cases")
                if k in result}
    return {"original": numbers(original), "rounded": None if rounded is None else numbers(rounded)}


def compare(original: dict, rounded: dict, max_auc_drop: float) -> tuple[str, str, dict]:
    """The ``sanitised-metric`` check of a model file that leaves as its rounded
    copy: (status, reason, held_out). ``original`` and ``rounded`` are ``run``'s
    results of predict on the export as written and on its rounded view
    (rounded.py). Pass when the copy's held-out AUC lies within ``max_auc_drop``
    of the original's (their accuracy at 0.5 where the held-out images have one
    label only); review when it is worse than that, so reviewers know the
    released model is, or when either could not be measured."""
    held_out = {"original": _held_out(original), "rounded": _held_out(rounded), "max_auc_drop": max_auc_drop}
    if "error" in original:
        return "review", ("the held-out metric of the rounded copy is not compared: the model as written was not "
                          f"measured ({original['error']})"), held_out
    if "error" in rounded:
        return "review", (f"predict failed on the rounded copy, so the released model's held-out metric is "
                          f"unknown: {rounded['error']}"), held_out
    if "test_accuracy" not in original or "test_accuracy" not in rounded:
        return "review", "no held-out images to measure the rounded copy on", held_out
    for metric in ("auc", "accuracy"):
        before, after = held_out["original"][metric], held_out["rounded"][metric]
        held_out[f"{metric}_drop"] = None if before is None or after is None else before - after
    compared = "auc" if held_out["auc_drop"] is not None else "accuracy"
    drop = held_out[f"{compared}_drop"]
    words = {"auc": "AUC", "accuracy": "accuracy at 0.5"}
    both = "; ".join(f"held-out {words[m]} {_number(held_out['original'][m])} as written, "
                     f"{_number(held_out['rounded'][m])} rounded" for m in ("auc", "accuracy"))
    if compared == "accuracy":
        both += " (one label among the held-out images: accuracy compared)"
    if drop > max_auc_drop + 1e-9:  # (0.8 - 0.75 is 0.05000000000000004 in floats)
        return "review", (f"the released (rounded) model is worse on the held-out cases: {words[compared]} "
                          f"{drop:.3f} lower, more than {max_auc_drop:g}; {both}"), held_out
    return "pass", f"the rounded copy keeps the held-out metric within {max_auc_drop:g}: {both}", held_out


def _held_out(result: dict) -> dict:
    return {"auc": result.get("test_auc"), "accuracy": result.get("test_accuracy"),
            "images": result.get("non_members")}


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def load_plan(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != PLAN_VERSION or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a membership plan")
    return data


def read_bounded(path: str) -> bytes | None:
    """At most MAX_OUTPUT_BYTES + 1 bytes of what the predict step wrote, never following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        import stat
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], MAX_OUTPUT_BYTES + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        return b"".join(chunks)
    finally:
        os.close(fd)
