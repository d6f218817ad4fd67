"""Disclosure control of a job's export (issue 23): every file gets pass, review or fail.

Two steps, both on the data side (the index and the export are as sensitive as
the dataset; neither goes to the gateway):

- ``python -m m2d.disclosure index --dataset DIR --out INDEX_DIR`` fingerprints
  the dataset once per version (index.py): content-defined chunks of every
  file, perceptual hashes of its images, keyed hashes of its identifier values,
  its case counts.
- ``python -m m2d.disclosure report --index INDEX_DIR --export DIR --out
  REPORT.json`` checks every export file against it (report.py), also inside
  archives and model checkpoints, without unpickling, loading or executing
  anything and within bounds (limits.py).

``m2d check-export`` runs the same report on a researcher's local export
against the twin dataset's index. /work/DISCLOSURE-INTERFACE.md (and
docs/disclosure.md) fix the report's shape and exit codes.
"""
