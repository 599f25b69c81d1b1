"""core/stats.py on hand-made numbers whose answers are known in closed form."""
import math

import pytest

from core.stats import binomial_interval, eval_size_for, mean_interval, paired_contrast, sampling_half_width, seeds_for


def test_mean_interval_is_student_t():
    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    s = mean_interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2 and s["sd"] == 1 and s["n"] == 3
    assert s["low"] == pytest.approx(2 - 2.484138, abs=1e-6) and s["high"] == pytest.approx(2 + 2.484138, abs=1e-6)
    # no spread: the interval is the point; one value: no interval at all
    assert mean_interval([0.4, 0.4])["low"] == mean_interval([0.4, 0.4])["high"] == 0.4
    assert mean_interval([0.4]) | {} == {"mean": 0.4, "low": None, "high": None, "sd": None, "n": 1}
    with pytest.raises(ValueError, match="finite"):
        mean_interval([0.1, math.nan])
    with pytest.raises(ValueError):
        mean_interval([])


def test_binomial_interval_is_wilson():
    # Wilson, z = 1.959964: 9 of 10 -> centre (9 + z^2/2) / (10 + z^2), half z sqrt(9*1/10 + z^2/4) / (10 + z^2)
    z = 1.959964
    centre = (9 + z * z / 2) / (10 + z * z)
    half = z * math.sqrt(0.9 * 0.1 * 10 + z * z / 4) / (10 + z * z)
    low, high = binomial_interval(0.9, 10)
    assert low == pytest.approx(centre - half, abs=1e-5) and high == pytest.approx(centre + half, abs=1e-5)
    assert binomial_interval(0.0, 500)[0] == 0.0 and binomial_interval(1.0, 500)[1] == 1.0
    assert sampling_half_width(50) == pytest.approx(0.1336, abs=1e-4)  # 25 of 50: [36.6, 63.4]
    assert sampling_half_width(51) == pytest.approx(0.1323, abs=1e-4)  # an odd n: 25 of 51
    with pytest.raises(ValueError, match="not a count"):
        binomial_interval(0.33, 10)
    with pytest.raises(ValueError, match="n >= 1"):
        binomial_interval(0.5, 0)


def test_eval_size_and_seeds_needed():
    assert eval_size_for(0.02) == 2401  # 1.96^2 * 0.25 / 0.02^2 = 2400.9
    assert eval_size_for(0.05, rate=0.1) == 139  # 1.96^2 * 0.09 / 0.0025 = 138.3
    assert seeds_for(0.05) == 6 and seeds_for(0.01) == 8  # 2/2^6 = 0.031, 2/2^7 = 0.016, 2/2^8 = 0.0078


def test_paired_contrast_tests_and_interval():
    c = paired_contrast([0.5, 0.3, 0.6], [0.2, 0.1, 0.3])
    assert c["differences"] == pytest.approx([0.3, 0.2, 0.3]) and c["mean"] == pytest.approx(0.8 / 3)
    # all 3 positive: sign test 2 * (1/2)^3; the sign flips' 8 means, the observed one and its mirror most extreme
    assert c["positive"] == 3 and c["sign_test_p"] == pytest.approx(0.25) and c["permutation_p"] == pytest.approx(0.25)
    assert c["smallest_p"] == 0.25 and c["low"] > 0
    six = paired_contrast([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0])
    assert six["sign_test_p"] == pytest.approx(1 / 32) and six["permutation_p"] == pytest.approx(1 / 32)
    # mixed signs: 2 of 4 positive, the sign test says nothing; ties are dropped from it
    mixed = paired_contrast([0.1, 0.2, 0.5, 0.4], [0.2, 0.1, 0.4, 0.5])
    assert mixed["positive"] == 2 and mixed["negative"] == 2 and mixed["sign_test_p"] == 1.0
    tie = paired_contrast([0.3, 0.5, 0.5], [0.3, 0.2, 0.1])
    assert tie["positive"] == 2 and tie["negative"] == 0 and tie["sign_test_p"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal-length"):
        paired_contrast([0.1, 0.2], [0.1])
