"""Adapters: the only code that talks to each external system.

Each has the same shape: a class that runs the system's commands or calls
(``from_config(cfg)`` builds it from the app's configuration), value objects
for what comes back, and one error type that carries the evidence (command,
status, stderr) without secrets. They stand alone (tests/test_imports.py):
the standard library, their own libraries and m2d.contract, nothing of the
gateway; what the gateway counts of their work it passes in (``on_error``).

    slurm        sbatch / sacct / squeue / scancel (cli_scheduler) or pyslurm
                 (pyslurm_scheduler) behind one Scheduler; accounting (sacctmgr,
                 sshare, sreport), limits, reasons (Slurm's codes in words)
    apptainer    apptainer build, through spython
    index_proxy  the only way a build reaches a package index
    mlflow       the MLflow server's admin API (users, experiments, grants)
    smtp         the mail server
"""
