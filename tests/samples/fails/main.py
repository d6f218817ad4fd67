import sklearn  # noqa: F401  (the environment is there; the code is wrong)

raise RuntimeError("m2d sample: this training script fails on purpose")
