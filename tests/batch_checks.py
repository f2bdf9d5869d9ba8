"""Helpers of the data-pipeline tests (test_data.py, test_buckets.py): read a few batches, compare two byte for byte."""


def take(ds, n):
    """The first `n` batches of dataset `ds`."""
    it = iter(ds)
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    """Two batches hold the same keys, each with the same shape and the same bytes."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
