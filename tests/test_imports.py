"""Which package may import which, read from the source (every import
statement, at any depth, so a lazy import inside a function counts too):

    jobs -> gateway -> m2d.contract      m2d -> m2d.contract
    bench -> gateway, jobs, tests.helpers    tests.helpers -> anything but a test module

m2d.contract is what the gateway and the researcher's client share: the
standard library only (sample_data also numpy and Pillow, the sample-data
extra), so the client installs without the server. The relay runs by path on a
compute node's python: the standard library only."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
SAMPLE_DATA_EXTRA = {"numpy", "PIL"}  # pyproject.toml's sample-data extra
DISCLOSURE_EXTRA = {"numpy", "PIL", "imagehash", "pyfastcdc", "openpyxl", "safetensors"}  # m2d[disclosure]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` imports the module x when it is one
            found.update(f"{name}.{alias.name}" for alias in node.names if (REPO / name.replace(".", "/") / f"{alias.name}.py").exists()
                         or (REPO / name.replace(".", "/") / alias.name).is_dir())
            found.add(name)
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "migrations/versions" not in str(p))


def top(name: str) -> str:
    return name.split(".")[0]


def broken(paths, allowed) -> list[str]:
    """'file imports name' for each import that ``allowed(path, name)`` refuses."""
    return [f"{p.relative_to(REPO)} imports {name}" for p in paths for name in sorted(imports(p)) if not allowed(p, name)]


def test_relative_imports_resolve_to_the_modules_they_name():
    assert {"gateway.extensions", "gateway.storage", "gateway.config", "gateway.admin"} <= imports(REPO / "gateway" / "app.py")
    assert "m2d.archive" in imports(REPO / "m2d" / "local.py")


def test_the_contract_imports_only_the_standard_library():
    def allowed(path, name):
        extra = SAMPLE_DATA_EXTRA if path.name == "sample_data.py" else set()
        return top(name) in STDLIB | extra or name.startswith("m2d.contract")

    assert broken(sources("m2d/contract"), allowed) == []


def test_the_disclosure_checker_imports_only_its_extra_and_the_contract():
    """It runs as the data side's report job and in `m2d check-export`: never the server's code."""
    def allowed(path, name):
        return top(name) in STDLIB | DISCLOSURE_EXTRA or name.startswith(("m2d.contract", "m2d.disclosure"))

    assert broken(sources("m2d/disclosure"), allowed) == []


def test_the_relay_imports_only_the_standard_library():
    assert broken([REPO / "singularity" / "relay.py"], lambda path, name: top(name) in STDLIB) == []


def test_m2d_imports_nothing_of_the_server_and_the_server_only_the_contract_of_m2d():
    def client(path, name):
        return top(name) not in {"gateway", "jobs", "tests", "bench", "relay"}

    def server(path, name):
        return top(name) != "m2d" or name == "m2d.contract" or name.startswith("m2d.contract.")

    assert broken([p for p in sources("m2d") if "contract" not in p.parts], client) == []
    assert broken(sources("gateway", "jobs", "deploy"), server) == []


def test_jobs_then_gateway_then_contract():
    assert broken(sources("gateway"), lambda path, name: top(name) not in {"jobs", "tests", "bench"}) == []
    assert broken(sources("jobs"), lambda path, name: top(name) not in {"tests", "bench"}) == []


@pytest.mark.parametrize("folder", ["tests", "bench"])
def test_no_module_imports_a_test_module(folder):
    """Helpers shared by tests and benches are in tests/helpers/; a test module is only run."""
    def allowed(path, name):
        return not any(part.startswith("test_") for part in name.split(".")) and not (
            folder == "bench" and top(name) == "tests" and not name.startswith("tests.helpers"))

    assert broken(sources(folder), allowed) == []
