"""Adapters: the only code that talks to each external system.

Each has the same shape: a class that runs the system's commands or calls
(``from_config(cfg)`` builds it from the app's configuration), value objects
for what comes back, and one error type that carries the evidence (command,
status, stderr) without secrets.

    slurm      sbatch / sacct / squeue / scancel (cli) or pyslurm (library)
    apptainer  apptainer build, through spython
    mlflow     the MLflow server's admin API (users, experiments, grants)
    smtp       the mail server
"""
