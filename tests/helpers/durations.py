"""tests/durations.json from a run's JUnit reports: the seconds of each test
that took at least MIN_SECONDS (setup, call and teardown), which conftest uses
to hand the longest out first under xdist. Refresh it after a full run:

    pytest ... --junitxml=run.xml && python -m tests.helpers.durations run.xml [more.xml]
"""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MIN_SECONDS = 5
OUTPUT = Path(__file__).resolve().parents[1] / "durations.json"


def node_id(case):
    """pytest's node id of a JUnit testcase (``tests.test_x`` + ``test_y[p]``); xdist's
    ``@group`` suffix dropped."""
    module = case.get("classname").replace(".", "/") + ".py"
    return f"{module}::{case.get('name')}".split("@", 1)[0]


def read(paths):
    seconds = {}
    for path in paths:
        for case in ET.parse(path).iter("testcase"):
            seconds[node_id(case)] = float(case.get("time", 0))
    return seconds


def main(paths):
    seconds = read(paths)
    kept = {name: round(value) for name, value in sorted(seconds.items(), key=lambda kv: -kv[1])
            if value >= MIN_SECONDS}
    OUTPUT.write_text(json.dumps(kept, indent=0) + "\n")
    print(f"{OUTPUT}: {len(kept)} of {len(seconds)} tests took {MIN_SECONDS} s or more; "
          f"{sum(seconds.values()):.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
