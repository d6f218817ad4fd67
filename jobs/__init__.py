"""The gateway's background processes: the rq worker (worker.py) and its tasks
(tasks.py: thin wrappers that take an id and call the core), the poller that
follows Slurm (poller.py) and the mail sender (mail.py).

What a task does lives in gateway/core/ (workflow.py: build, dry run, sbatch,
cancel); the batch script is rendered by gateway/core/jobscript.py; the
adapters are in gateway/adapters/; the MLflow relay a job runs is
singularity/relay.py, a file run by path beside the batch script.
"""
