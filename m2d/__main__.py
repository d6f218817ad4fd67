"""python -m m2d: the researcher's command line (m2d/cli.py)."""
import sys

from .cli import main

sys.exit(main())
