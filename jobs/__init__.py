"""Background work: the rq worker and its tasks (build, submit, cancel, dry run), the
poller that follows Slurm, the batch script's renderer and the mail sender.

The Slurm and Apptainer adapters live in gateway/adapters/; the MLflow relay a job
runs is singularity/relay.py, a file run by path beside the batch script.
"""
