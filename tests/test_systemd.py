"""The systemd units in deploy/systemd are ones systemd accepts.

`systemd-analyze verify` needs no running systemd: it loads the units from a
copy of /etc/systemd/system under --root. It checks that ExecStart's program
exists under that root, so the root gets systemd's own units and the two programs the units run
(/opt/m2d/.venv/bin/gunicorn and python, stand-ins)."""
import shutil
import subprocess

from .helpers.stack import REPO

UNITS = REPO / "deploy" / "systemd"


def test_systemd_analyze_verify_accepts_every_unit(tmp_path):
    assert shutil.which("systemd-analyze"), "apt-get install systemd (systemd-analyze verifies the units)"
    # the root needs systemd's own units too (sysinit.target, network-online.target...)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    system = tmp_path / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    for unit in UNITS.iterdir():
        shutil.copy(unit, system / unit.name)
    bin_dir = tmp_path / "opt" / "m2d" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("gunicorn", "python"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    names = sorted(p.name for p in UNITS.iterdir())
    assert {"m2d.target", "m2d-web.service", "m2d-poller.service"} <= set(names)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tmp_path}",
                             *(str(system / n) for n in names)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_only_the_workers_that_sudo_to_the_job_account_lack_no_new_privileges():
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert "Restart=on-failure" in text and "ProtectSystem=strict" in text and "PrivateTmp=true" in text
        assert ("NoNewPrivileges=true" in text) == (not unit.name.startswith("m2d-worker-")), unit.name
