"""deploy/testbed/lib.sh's settings: the environment wins, then what up.sh last
used for the folder (testbed.env), then the defaults (two compute nodes); a
testbed made before the setting existed stays single-node until remade."""
import os
import subprocess
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "deploy" / "testbed" / "lib.sh"
KEYS = ("M2D_TESTBED_NODES", "M2D_MLFLOW_PORT", "SLURMCTLD_PORT")


def settings(folder, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("M2D_", "SLURM"))}
    out = subprocess.run(["bash", "-c", f'source "{LIB}"; set_testbed_dir "$1"; save_testbed_settings; '
                          'echo "$M2D_TESTBED_NODES $M2D_MLFLOW_PORT $SLURMCTLD_PORT $GATEWAY_ADDR"', "x", str(folder)],
                         env=clean | env, capture_output=True, text=True, check=True).stdout.split()
    return dict(zip((*KEYS, "GATEWAY_ADDR"), out))


def test_a_new_testbed_has_two_nodes_and_keeps_what_it_was_made_with(tmp_path):
    assert settings(tmp_path) == {"M2D_TESTBED_NODES": "2", "M2D_MLFLOW_PORT": "5001", "SLURMCTLD_PORT": "6817",
                                  "GATEWAY_ADDR": "10.77.0.1"}
    settings(tmp_path, M2D_TESTBED_NODES="3", M2D_MLFLOW_PORT="5011", M2D_TESTBED_SUBNET="10.79.0")
    assert settings(tmp_path) == {"M2D_TESTBED_NODES": "3", "M2D_MLFLOW_PORT": "5011", "SLURMCTLD_PORT": "6817",
                                  "GATEWAY_ADDR": "10.79.0.1"}
    # the environment wins (switching modes)
    assert settings(tmp_path, M2D_TESTBED_NODES="1")["M2D_TESTBED_NODES"] == "1"


def test_a_testbed_made_before_the_setting_stays_single_node(tmp_path):
    (tmp_path / "slurm" / "etc").mkdir(parents=True)
    (tmp_path / "slurm" / "etc" / "slurm.conf").write_text("ClusterName=testbed\n")
    assert settings(tmp_path)["M2D_TESTBED_NODES"] == "1"
    assert settings(tmp_path, M2D_TESTBED_NODES="2")["M2D_TESTBED_NODES"] == "2"
    assert settings(tmp_path)["M2D_TESTBED_NODES"] == "2"  # kept once remade with nodes


def test_no_deploy_script_stops_reading_a_pipe_early_under_pipefail():
    """`long listing | grep -q x` fails under pipefail once the listing outgrows
    a pipe buffer (grep exits at the match, the writer dies of SIGPIPE): a
    testbed with a few hundred Slurm accounts failed `make testbed` so."""
    early = subprocess.run(["bash", "-c", "set -o pipefail; seq 1 100000 | grep -qx 1"])
    assert early.returncode != 0  # the trap itself
    scripts = sorted((LIB.parents[1]).rglob("*.sh"))
    offenders = [f"{path.name}:{n}" for path in scripts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "| grep -q" in line]
    assert scripts and not offenders
