"""Background work: rq tasks, the Slurm adapter, the image builder, the poller, mail."""
