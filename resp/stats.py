"""Bootstrap intervals over evaluation items, for the report (pure numpy): the percentile bootstrap of
`scipy.stats.bootstrap` (method="percentile", the same generator), which tests/test_stats.py checks
number for number. Kept as these few lines because scipy refuses a single item ("two or more
observations"), which a one-item study or a smoke run gives.

An item's value is a 0/1 score (or any number); with several sampled seeds per item it is the
item's mean over its seeds (`per_item` of shape items x seeds). Items are resampled with
replacement, `samples` times, by `numpy.random.default_rng(seed)`; the interval is the
percentile interval of the resampled means at `confidence` (e.g. 0.95: the 2.5th and 97.5th
percentiles, linear interpolation). The same inputs and seed give the same numbers.

A paired difference a - b resamples the item indices jointly: both methods see the same items in
every resample, so the variation shared by the items (hard items are hard for both) cancels,
and the interval is that of the per-item differences.
"""

from __future__ import annotations

import numpy as np


def item_values(per_item) -> np.ndarray:
    """One value per item: a 1-D array as it is, a 2-D array (items x seeds) as its mean over seeds."""
    values = np.asarray(per_item, dtype=np.float64)
    if values.ndim == 2:
        if values.shape[1] == 0:
            raise ValueError("per_item has no seeds (shape items x 0)")
        values = values.mean(axis=1)
    elif values.ndim != 1:
        raise ValueError(f"per_item must be items or items x seeds, not an array of shape {values.shape}")
    if values.size == 0:
        raise ValueError("per_item has no items")
    return values


def resample_indices(n_items: int, samples: int, seed: int) -> np.ndarray:
    """The item indices of every resample: `samples` rows of `n_items` draws with replacement."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    return np.random.default_rng(seed).integers(0, n_items, size=(samples, n_items))


def _interval(values: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    means = values[resample_indices(values.size, samples, seed)].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def bootstrap_interval(per_item, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of the mean over items; `per_item` is items or items x seeds."""
    return _interval(item_values(per_item), samples, confidence, seed)


def paired_difference(a, b, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean of a - b, low, high) on the same items, resampled jointly; a and b must have the same shape."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same items (and seeds): shapes {a.shape} and {b.shape} differ")
    return _interval(item_values(a) - item_values(b), samples, confidence, seed)


def cluster_bootstrap(values, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of `values` (seeds x items), resampling seeds with replacement and
    then, within each drawn seed, items with replacement (a two-stage cluster bootstrap): the interval
    covers which calibration traces were drawn as well as which test items. For a paired difference
    pass the per-(seed, item) differences. One seed reduces to the item bootstrap of that seed."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"values must be seeds x items with at least one of each, not shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    n_seeds, n_items = values.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(samples, n_seeds))
    items = rng.integers(0, n_items, size=(samples, n_seeds, n_items))
    means = values[seeds[..., None], items].mean(axis=(1, 2))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)
