"""The settings table: typed parsing, refusals that name the setting, and the
reference in docs/configuration.md generated from it (so the two cannot drift)."""
import pytest

from gateway import config
from gateway.config import ConfigError, from_environment


def test_configuration_reference_is_what_the_table_generates():
    assert config.REFERENCE_PATH.read_text() == config.reference(), (
        "docs/configuration.md differs from gateway/config.py's table: run `python -m gateway.config`")


def test_every_setting_is_in_the_reference_with_its_default():
    text = config.reference()
    for setting in config.SETTINGS:
        assert f"`M2D_{setting.name}`" in text


def test_environment_values_become_the_settings_types():
    cfg = from_environment({"M2D_SLURM_GPUS": "2", "M2D_APPTAINER_NV": "yes", "M2D_DRY_RUN": "0",
                            "M2D_MAX_COMPRESSION_RATIO": "50", "M2D_PYTHONS": "3.11, 3.13",
                            "M2D_BASE_IMAGES": "3.9=/i/a.sif", "M2D_MLFLOW_ADMIN_PASSWORD": "12e45",
                            "M2D_MAIL_RETRY_SECONDS": "2, 5,10"})
    assert cfg == {"SLURM_GPUS": 2, "APPTAINER_NV": True, "DRY_RUN": False, "MAX_COMPRESSION_RATIO": 50.0,
                   "PYTHONS": ("3.11", "3.13"), "BASE_IMAGES": {"3.9": "/i/a.sif"},
                   "MLFLOW_ADMIN_PASSWORD": "12e45", "MAIL_RETRY_SECONDS": (2, 5, 10)}


@pytest.mark.parametrize("name, value, expected", [
    ("SLURM_GPUS", "two", "a whole number"),
    ("APPTAINER_NV", "maybe", "1/0, true/false"),
    ("MAX_COMPRESSION_RATIO", "lots", "a number"),
    ("SLURM_ADAPTER", "pbs", "one of cli, pyslurm"),
    ("BASE_IMAGES", "3.9", "KEY=VALUE"),
    ("MAIL_RETRY_SECONDS", "5,15m", "a list of whole numbers"),
])
def test_a_bad_value_is_refused_naming_the_setting_the_value_and_what_is_expected(name, value, expected):
    with pytest.raises(ConfigError) as refused:
        from_environment({f"M2D_{name}": value})
    message = str(refused.value)
    assert f"M2D_{name}" in message and repr(value) in message and expected in message


def test_create_app_refuses_a_bad_setting(monkeypatch, tmp_path):
    from gateway import create_app
    monkeypatch.setenv("M2D_POLL_INTERVAL", "10s")
    with pytest.raises(ConfigError, match="M2D_POLL_INTERVAL='10s'"):
        create_app({"TESTING": True, "DATA_DIR": str(tmp_path)})


@pytest.mark.parametrize("process", [
    ["gunicorn", "--workers", "1", "--bind", "127.0.0.1:0", "gateway:create_app()"],
    ["-m", "jobs.worker", "build"],
    ["-m", "jobs.poller"],
    ["-m", "flask", "--app", "gateway", "users", "list"],
])
def test_a_bad_setting_stops_the_real_process_at_start_naming_it(process, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    command = ([str(Path(sys.executable).parent / "gunicorn"), *process[1:]] if process[0] == "gunicorn"
               else [sys.executable, *process])
    env = {"PATH": os.environ["PATH"], "M2D_SECRET_KEY": "k", "M2D_DATA_DIR": str(tmp_path),
           "M2D_REDIS_URL": "redis://127.0.0.1:1/0", "M2D_SLURM_GPUS": "two"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode != 0
    assert "M2D_SLURM_GPUS='two' is not valid: expected a whole number" in result.stdout + result.stderr
    if process[0] != "gunicorn":  # ours say it in one line; gunicorn's arbiter logs the worker's traceback
        assert "Traceback" not in result.stderr, result.stderr
