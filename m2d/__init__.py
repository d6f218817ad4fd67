"""m2d: the researcher's toolkit for the Model-to-Data Gateway.

Make a synthetic CLaM sample, run a submission locally against it the way the
platform runs it, check and zip a submission with the platform's own rules, and
submit it and follow it through the API. ``python -m m2d --help`` lists the
commands; each is a function in this package that other programs can call.
"""

from m2d.contract import __version__

__all__ = ["__version__"]
