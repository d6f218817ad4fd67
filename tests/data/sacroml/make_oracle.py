"""SACRO-ML's own numbers for the membership attack of m2d/disclosure/membership.py on fixed
predictions, written to oracle.json beside this file
(tests/test_membership.py::test_the_attack_auc_is_sacromls_on_the_same_predictions).

Run it with sacroml installed (not a test dependency: torch, scikit-learn, acro...):

    python3 -m venv /tmp/sacroml && /tmp/sacroml/bin/pip install sacroml==2.0.1
    /tmp/sacroml/bin/python tests/data/sacroml/make_oracle.py

Each case is a fixed list of records (the model's probability of malignant, the
label, member or not: Split=train or test), made here once with a seeded generator
and kept in oracle.json, so the test reads the very numbers sacroml read.

sacroml has no plain loss-threshold attack: its attacks train a classifier
(WorstCaseAttack), shadow models (LikelihoodAttack) or a quantile regressor (QMIA).
What it does have is the metric every attack reports, ``sacroml.metrics.get_metrics``
(AUC by sklearn's roc_auc_score, TPR at fixed FPRs, the AUC's p-value...). Two
numbers per case:

- ``loss_threshold``: get_metrics on the loss-threshold attack's scores, the
  probability the model gives the true label (sacroml's own loss,
  ``Model.get_losses``, is 1 minus it; a lower loss means member), members as
  positives: the same attack as ours, scored by sacroml. Our AUC must equal it.
- ``worst_case``: WorstCaseAttack.attack_from_preds on the per-record class
  probabilities [1 - p, p] with the model-correct feature, SACRO-ML's default
  worst-case attack otherwise (a random forest trained on 80 % of the records, AUC on
  the other 20 %, 10 repetitions with fixed splits). A different attack on purpose:
  it learns which probabilities mark members and is measured on held-out records,
  ours thresholds the loss over every record. Kept for reviewers' comparison; the
  test only asks that both see the memorising model and neither the one with no
  signal.
"""
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

logging.disable(logging.CRITICAL)
warnings.filterwarnings("ignore")

from sacroml import metrics  # noqa: E402
from sacroml.attacks.worst_case_attack import WorstCaseAttack  # noqa: E402
from sacroml.version import __version__  # noqa: E402

MEMBERS, NON_MEMBERS = 60, 40
TPR_AT = ("TPR@0.5%", "TPR@0.1%")  # sacroml names FPRs in per cent


def cases() -> dict[str, list[dict]]:
    rng = np.random.default_rng(20231)

    def records(member_p, non_member_p) -> list[dict]:
        out = []
        for member, make, n in ((True, member_p, MEMBERS), (False, non_member_p, NON_MEMBERS)):
            labels = rng.integers(0, 2, n)
            for label in labels:
                out.append({"p": float(make(int(label))), "label": int(label), "member": member})
        return out

    def towards(label: int, strength: float) -> float:
        """A probability of malignant leaning ``strength`` towards the label, rounded (ties)."""
        lean = float(np.clip(rng.normal(strength, 0.15), 0, 0.5))
        return round(0.5 + lean if label else 0.5 - lean, 2)

    return {
        # confident and right on its training cases, unsure on the others
        "memorising": records(lambda y: towards(y, 0.45), lambda y: towards(y, 0.1)),
        # as good on both: nothing to tell members by
        "no signal": records(lambda y: towards(y, 0.2), lambda y: towards(y, 0.2)),
        "some overfit": records(lambda y: towards(y, 0.25), lambda y: towards(y, 0.15)),
        # probabilities of exactly 0 and 1 and below ours' loss clip (1e-7): ranked by the
        # true label's probability, not the clipped loss, they do not tie
        "extremes": records(lambda y: [1.0, 1 - 1e-9, 0.999, 1e-12][rng.integers(0, 4)] if y else
                            [0.0, 1e-9, 0.001, 1 - 1e-12][rng.integers(0, 4)],
                            lambda y: [1e-9, 0.0, 0.5, 1e-12][rng.integers(0, 4)] if y else
                            [1 - 1e-9, 1.0, 0.5, 0.0][rng.integers(0, 4)]),
    }


def loss_threshold(records: list[dict]) -> dict:
    score = np.array([r["p"] if r["label"] else 1.0 - r["p"] for r in records])
    member = np.array([1 if r["member"] else 0 for r in records])
    found = metrics.get_metrics(np.column_stack([1.0 - score, score]), member, permute_rows=False)
    return {"AUC": float(found["AUC"]), "P_HIGHER_AUC": float(found["P_HIGHER_AUC"]),
            **{k: float(found[k]) for k in TPR_AT}}


def worst_case(records: list[dict]) -> dict:
    def split(member: bool):
        chosen = [r for r in records if r["member"] == member]
        proba = np.array([[1.0 - r["p"], r["p"]] for r in chosen])
        correct = np.array([1 if (r["p"] >= 0.5) == bool(r["label"]) else 0 for r in chosen])
        return proba, correct
    (train, train_correct), (test, test_correct) = split(True), split(False)
    with tempfile.TemporaryDirectory() as out:
        attack = WorstCaseAttack(output_dir=out, write_report=False, n_dummy_reps=0,
                                 include_model_correct_feature=True)
        np.random.seed(0)  # (the forest draws from numpy's global generator)
        attack.attack_from_preds(train, test, train_correct=train_correct, test_correct=test_correct)
    aucs = [float(m["AUC"]) for m in attack.attack_metrics]
    return {"mean_AUC": float(np.mean(aucs)), "AUCs": aucs, "reps": len(aucs),
            "config": "WorstCaseAttack(n_reps=10, reproduce_split=5, test_prop=0.2, sort_probs=True, "
                      "include_model_correct_feature=True, RandomForestClassifier min_samples_split=20 "
                      "min_samples_leaf=10 max_depth=5)"}


def main() -> None:
    oracle = {"sacroml": __version__, "cases": {}}
    for name, records in cases().items():
        oracle["cases"][name] = {"records": records, "loss_threshold": loss_threshold(records),
                                 "worst_case": worst_case(records)}
    (Path(__file__).parent / "oracle.json").write_text(json.dumps(oracle, indent=1) + "\n")


if __name__ == "__main__":
    main()
