import statistics


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1-99) of ``values``, inclusive method; the value itself for one."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]
