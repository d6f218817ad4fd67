"""ACRO's own verdicts on the dominance and threshold cases of tests/test_disclosure.py
(test_table_checks_agree_with_acro), written to oracle.json beside this file.

Run it with acro installed (not a test dependency: pandas, statsmodels, matplotlib):

    python3 -m venv /tmp/acro && /tmp/acro/bin/pip install acro==1.0.2
    /tmp/acro/bin/python tests/data/acro/make_oracle.py

Each magnitude case is one cell of acro.crosstab(..., values=, aggfunc="sum") made of
the case's contributions; each count case one cell of a frequency crosstab of that many
records. ACRO's default risk appetite (acro/default.yaml: threshold 10, N=2 K=90 %,
p-ratio 10 %, zeros disclosive) judges them; the flags per check are kept.
"""
import json
import logging
from pathlib import Path

import pandas as pd

logging.disable(logging.CRITICAL)

from acro import ACRO  # noqa: E402
from acro.version import __version__  # noqa: E402

MAGNITUDES = {  # contributions of one cell
    "two dominate": [50, 45, 5],
    "one dominates": [90, 5, 5],
    "exactly 90 %": [45, 45, 10],
    "even": [10] * 12,
    "single": [100],
    "two alone": [60, 40],
    "spread": [30, 30, 30, 10],
    "large remainder": [100, 80] + [5] * 10,
    "negative part": [50, -10, 30, 30],
    "just over 10 % left": [100, 80, 6, 5],
}
COUNTS = [1, 3, 9, 10, 25]


def flags(sdc: dict, row: int) -> list[str]:
    return sorted(check for check, cells in sdc["cells"].items() if [row, 0] in cells)


def main() -> None:
    acro = ACRO(suppress=False)
    magnitudes = {}
    for label, values in MAGNITUDES.items():  # a table each: a negative part changes ACRO's whole table
        data = pd.DataFrame({"group": "g", "col": "x", "value": values})
        acro.crosstab(data.group, data.col, values=data.value, aggfunc="sum")
        magnitudes[label] = {"contributions": values, "flags": flags(acro.results.get_index(-1).sdc, 0)}
    counted = [(f"c{i:02d}", n) for i, n in enumerate(COUNTS)]
    records = pd.DataFrame({"group": [g for g, n in counted for _ in range(n)], "col": "x"})
    acro.crosstab(records.group, records.col)
    count_sdc = acro.results.get_index(-1).sdc
    oracle = {"acro": __version__, "magnitudes": magnitudes,
              "counts": {str(n): flags(count_sdc, i) for i, n in enumerate(COUNTS)}}
    (Path(__file__).parent / "oracle.json").write_text(json.dumps(oracle, indent=1) + "\n")


if __name__ == "__main__":
    main()
