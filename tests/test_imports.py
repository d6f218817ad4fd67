"""Which package may import which, read from the source (every import
statement, at any depth, so a lazy import inside a function counts too):

    jobs -> gateway.core, gateway's plumbing -> gateway.adapters -> m2d.contract
    gateway.web (only gateway.app registers it) -> gateway.core
    m2d -> m2d.contract
    bench -> gateway, jobs, tests.helpers    tests.helpers -> anything but a test module

The adapters stand alone: the standard library, their own libraries and
m2d.contract; what the gateway counts of their work it passes in.

m2d.contract is what the gateway and the researcher's client share: the
standard library only (sample_data also numpy and Pillow, the sample-data
extra), so the client installs without the server. The relay runs by path on a
compute node's python: the standard library only."""
import ast
import functools
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


@functools.cache  # each rule reads every file: parse each once
def imports(path: Path) -> frozenset[str]:
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
    return frozenset(found)


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "migrations/versions" not in str(p))


def top(name: str) -> str:
    return name.split(".")[0]


def broken(paths, allowed) -> list[str]:
    """'file imports name' for each import that ``allowed(path, name)`` refuses."""
    return [f"{p.relative_to(REPO)} imports {name}" for p in paths for name in sorted(imports(p)) if not allowed(p, name)]


def test_relative_imports_resolve_to_the_modules_they_name():
    assert {"gateway.extensions", "gateway.core.storage", "gateway.config", "gateway.web.admin"} <= imports(REPO / "gateway" / "app.py")
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


# what the web app and the workers are made of, which an adapter must not need
SERVER_FRAMEWORKS = {"flask", "flask_login", "flask_wtf", "flask_limiter", "flask_migrate", "flask_sqlalchemy",
                     "sqlalchemy", "rq", "redis", "prometheus_client"}


def adapter_may_import(path, name) -> bool:
    if top(name) in {"gateway", "jobs", "tests", "bench", "m2d"}:
        return name.startswith("gateway.adapters") or name == "m2d.contract" or name.startswith("m2d.contract.")
    return top(name) not in SERVER_FRAMEWORKS


def core_may_import(path, name) -> bool:
    return not name.startswith("gateway.web") and top(name) != "jobs"


def test_the_adapters_stand_alone():
    assert broken(sources("gateway/adapters"), adapter_may_import) == []


def test_the_core_imports_neither_the_web_nor_the_workers():
    assert broken(sources("gateway/core"), core_may_import) == []


def test_only_the_app_factory_imports_the_web():
    """Workers, commands and the core never need a page; the factory registers the blueprints."""
    outside = [p for p in sources("gateway", "jobs") if "web" not in p.relative_to(REPO).parts
               and p != REPO / "gateway" / "app.py"]
    assert broken(outside, lambda path, name: not name.startswith("gateway.web")) == []


def test_a_wrong_import_is_named(tmp_path, monkeypatch):
    """The checks read what they are meant to: an adapter that imports the
    gateway's counters or Flask, and a core module that imports a page or a
    task, are each named."""
    adapter = tmp_path / "gateway" / "adapters" / "slurm" / "bad.py"
    core = tmp_path / "gateway" / "core" / "bad.py"
    for folder in (adapter.parent, core.parent, tmp_path / "gateway" / "web", tmp_path / "jobs"):
        folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "gateway" / "metrics.py").write_text("")
    (tmp_path / "gateway" / "web" / "ops.py").write_text("")
    adapter.write_text("from ...metrics import SLURM_ERRORS\nimport flask\nfrom . import cli_scheduler\n")
    core.write_text("def lazy():\n    from ..web import ops\n    from jobs import tasks\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert broken([adapter], adapter_may_import) == ["gateway/adapters/slurm/bad.py imports flask",
                                                     "gateway/adapters/slurm/bad.py imports gateway.metrics"]
    assert broken([core], core_may_import) == ["gateway/core/bad.py imports gateway.web",
                                               "gateway/core/bad.py imports gateway.web.ops",
                                               "gateway/core/bad.py imports jobs"]
