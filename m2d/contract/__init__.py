"""What the gateway and the researcher's m2d client share, owned by m2d.

The gateway and its workers import these modules and nothing else of m2d; they
import only the standard library (sample_data also numpy and Pillow, the
``sample-data`` extra), so the client installs without any of the server.
tests/test_imports.py holds both rules.

- validation: the rules of a valid submission zip and their refusals
- states: the states of a submission, their order and legal moves
- twin, sample_data: the synthetic twin of the dataset (dry runs, `m2d run`)
"""

# The client's version; the gateway serves this client and reports this version
# (header M2D-Version), so an m2d of another version can warn.
__version__ = "0.1.0"
