"""resp.stats: bootstrap intervals over items, exact on hand-built cases, deterministic for a seed,
and paired (a method compared with another on the same resampled items)."""

from __future__ import annotations

import numpy as np
import pytest

from resp.stats import bootstrap_interval, item_values, paired_difference, resample_indices, cluster_bootstrap

SAMPLES, CONFIDENCE, SEED = 2000, 0.95, 0


def test_constant_items_give_a_zero_width_interval_at_the_mean():
    assert bootstrap_interval([1] * 50, SAMPLES, CONFIDENCE, SEED) == (1.0, 1.0, 1.0)
    assert bootstrap_interval([0] * 50, SAMPLES, CONFIDENCE, SEED) == (0.0, 0.0, 0.0)
    assert bootstrap_interval([[1, 1, 1]] * 7, SAMPLES, CONFIDENCE, SEED) == (1.0, 1.0, 1.0)
    assert bootstrap_interval([0.25], SAMPLES, CONFIDENCE, SEED) == (0.25, 0.25, 0.25)   # one item: every resample is it


def test_mean_is_the_plain_mean_and_seeds_average_within_an_item():
    values = [1, 0, 0, 1, 1, 1, 0, 1]
    mean, low, high = bootstrap_interval(values, SAMPLES, CONFIDENCE, SEED)
    assert mean == 5 / 8
    assert low <= mean <= high and low < high
    # items x seeds: item values 1, 1/3, 0, 2/3 -> mean 0.5
    assert item_values([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]]).tolist() == [1.0, 1 / 3, 0.0, 2 / 3]
    assert bootstrap_interval([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]], SAMPLES, CONFIDENCE, SEED)[0] == 0.5


def test_two_items_hand_computed():
    """Items 0 and 1: resampled means are 0, 1/2, 1 with chances 1/4, 1/2, 1/4; of 2000 resamples about
    500 are 0 and 500 are 1, so the 2.5th and 97.5th percentiles (positions 49.975 and 1949.025 of the
    sorted means) are exactly 0 and 1."""
    assert bootstrap_interval([0, 1], SAMPLES, CONFIDENCE, SEED) == (0.5, 0.0, 1.0)


def test_small_case_with_the_fixed_resample():
    """Five resamples of three items, recomputed by hand from the drawn indices: the percentile
    interval is linear interpolation between the sorted resample means."""
    values, samples, confidence = [0.0, 1.0, 1.0], 5, 0.5
    indices = resample_indices(3, samples, SEED)
    assert indices.shape == (5, 3) and indices.min() >= 0 and indices.max() <= 2
    means = sorted(sum(values[i] for i in row) / 3 for row in indices.tolist())

    def percentile(q):  # numpy's default ("linear"): position q/100 * (n - 1) in the sorted values
        position = q / 100 * (len(means) - 1)
        below = int(position)
        above = min(below + 1, len(means) - 1)
        return means[below] + (position - below) * (means[above] - means[below])

    mean, low, high = bootstrap_interval(values, samples, confidence, SEED)
    assert mean == 2 / 3
    assert low == pytest.approx(percentile(25), abs=1e-12)
    assert high == pytest.approx(percentile(75), abs=1e-12)


def test_the_same_seed_gives_the_same_numbers_and_another_seed_other_resamples():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 2, size=120), rng.integers(0, 2, size=120)
    assert bootstrap_interval(a, SAMPLES, CONFIDENCE, 3) == bootstrap_interval(a.copy(), SAMPLES, CONFIDENCE, 3)
    assert paired_difference(a, b, SAMPLES, CONFIDENCE, 3) == paired_difference(a, b, SAMPLES, CONFIDENCE, 3)
    assert not np.array_equal(resample_indices(120, 10, 3), resample_indices(120, 10, 4))


def test_interval_contains_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    few, many = rng.integers(0, 2, size=40), rng.integers(0, 2, size=4000)
    for values in (few, many):
        mean, low, high = bootstrap_interval(values, SAMPLES, CONFIDENCE, SEED)
        assert low < mean < high
    assert (lambda m, lo, hi: hi - lo)(*bootstrap_interval(many, SAMPLES, CONFIDENCE, SEED)) < \
        (lambda m, lo, hi: hi - lo)(*bootstrap_interval(few, SAMPLES, CONFIDENCE, SEED)) / 5


def test_paired_difference_of_identical_items_is_exactly_zero():
    a = [1, 0, 1, 1, 0, 0, 1]
    assert paired_difference(a, list(a), SAMPLES, CONFIDENCE, SEED) == (0.0, 0.0, 0.0)
    seeds = [[1, 0, 1], [0, 0, 1], [1, 1, 1]]
    assert paired_difference(seeds, seeds, SAMPLES, CONFIDENCE, SEED) == (0.0, 0.0, 0.0)


def test_paired_difference_value_and_sign():
    a = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    b = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    diff, low, high = paired_difference(a, b, SAMPLES, CONFIDENCE, SEED)
    assert diff == pytest.approx(0.4)
    assert 0 < low <= diff <= high <= 1
    assert paired_difference(b, a, SAMPLES, CONFIDENCE, SEED) == pytest.approx((-diff, -high, -low))


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1, 0, 1], [1, 0], SAMPLES, CONFIDENCE, SEED)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([[1, 0], [0, 1]], [[1, 0, 1], [0, 1, 1]], SAMPLES, CONFIDENCE, SEED)
    with pytest.raises(ValueError, match="no items"):
        bootstrap_interval([], SAMPLES, CONFIDENCE, SEED)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1, 0], SAMPLES, 1.0, SEED)


def test_pairing_narrows_the_interval_when_items_are_correlated():
    """Two methods that agree on all but 6 of 300 items: resampled jointly, the shared item
    difficulty cancels; resampled independently (an unpaired bootstrap) it does not."""
    rng = np.random.default_rng(11)
    b = rng.integers(0, 2, size=300)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:6]] = 1          # a fixes six items b gets wrong
    diff, low, high = paired_difference(a, b, SAMPLES, CONFIDENCE, SEED)
    assert diff == pytest.approx(6 / 300)
    assert low > 0                              # paired: the improvement is detected
    # the unpaired bootstrap: a and b resampled with independent indices
    means_a = a[resample_indices(300, SAMPLES, 1)].mean(axis=1)
    means_b = b[resample_indices(300, SAMPLES, 2)].mean(axis=1)
    unpaired_low, unpaired_high = np.percentile(means_a - means_b, [2.5, 97.5])
    assert unpaired_low < 0 < unpaired_high     # unpaired: the same data show no effect
    assert high - low < (unpaired_high - unpaired_low) / 4


def test_cluster_bootstrap_covers_the_spread_between_seeds():
    # items agree within a seed, seeds disagree: every resample's mean is 0, 1/2 or 1 (P = 1/4, 1/2, 1/4),
    # so the 95 % interval is [0, 1]; treating the 2 x 50 values as 100 independent items would give ~[0.4, 0.6]
    values = np.array([[0.0] * 50, [1.0] * 50])
    assert cluster_bootstrap(values, 2000, 0.95, 0) == (0.5, 0.0, 1.0)
    pooled = bootstrap_interval(values.ravel(), 2000, 0.95, 0)
    assert 0.35 < pooled[1] < pooled[2] < 0.65


def test_cluster_bootstrap_with_identical_seeds_is_an_item_bootstrap():
    row = np.array([1.0] * 30 + [0.0] * 70)
    mean, low, high = cluster_bootstrap(np.stack([row, row, row]), 4000, 0.95, 0)
    _, item_low, item_high = bootstrap_interval(row, 4000, 0.95, 0)
    assert mean == pytest.approx(0.3)
    # three copies of one seed are three independent item resamples: narrower by about sqrt(3)
    assert (high - low) == pytest.approx((item_high - item_low) / np.sqrt(3), rel=0.15)
    assert cluster_bootstrap(np.zeros((3, 5)), 100, 0.9, 1) == (0.0, 0.0, 0.0)
    assert cluster_bootstrap(np.stack([row, 1 - row]), 500, 0.95, 7) == cluster_bootstrap(np.stack([row, 1 - row]), 500, 0.95, 7)


def test_cluster_bootstrap_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"values must be seeds x items with at least one of each, not shape \(4,\)"):
        cluster_bootstrap(np.zeros(4), 100, 0.95, 0)
    with pytest.raises(ValueError, match=r"not shape \(0, 3\)"):
        cluster_bootstrap(np.zeros((0, 3)), 100, 0.95, 0)


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_intervals_are_scipys_percentile_bootstrap(confidence):
    """resp.stats is scipy.stats.bootstrap (method "percentile") with the same generator: the same resamples,
    the same interval, and for a paired difference scipy's paired=True on (a, b)."""
    from scipy import stats

    rng = np.random.default_rng(3)
    a = (rng.random((60, 3)) < 0.6).astype(float)   # items x seeds: an item's value is its mean over seeds
    b = (rng.random((60, 3)) < 0.4).astype(float)

    def scipy_interval(data, statistic, **kwargs):
        result = stats.bootstrap(data, statistic, n_resamples=SAMPLES, confidence_level=confidence, method="percentile",
                                 rng=np.random.default_rng(SEED), vectorized=True, **kwargs)
        return result.confidence_interval.low, result.confidence_interval.high

    mean, low, high = bootstrap_interval(a, SAMPLES, confidence, SEED)
    assert mean == item_values(a).mean()
    assert (low, high) == pytest.approx(scipy_interval((item_values(a),), np.mean), abs=1e-12)

    difference, low, high = paired_difference(a, b, SAMPLES, confidence, SEED)
    assert difference == pytest.approx(item_values(a).mean() - item_values(b).mean(), abs=1e-12)
    paired = scipy_interval((item_values(a), item_values(b)), lambda x, y, axis: (x - y).mean(axis=axis), paired=True)
    assert (low, high) == pytest.approx(paired, abs=1e-12)
