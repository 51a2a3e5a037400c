"""The shared parts of every method: the budget and how counts are apportioned."""

import pytest

from llava.model.compression.common import Budget, apportion, crop_geometry


def test_apportion_caps_and_redistributes():
    assert apportion(10, [1.0, 1.0, 1.0], [2, 10, 10]) == [2, 4, 4]  # 3.33 > cap 2: the rest split 4 / 4
    assert apportion(7, [0.0, 0.0], [5, 5]) == [4, 3]                 # no weight: equal shares, remainder low first
    assert apportion(50, [1.0, 3.0], [4, 30]) == [4, 30]              # more than the caps: everything
    assert apportion(3, [0.2, 0.3, 0.5], [9, 9, 9]) == [1, 1, 1]      # .6 .9 1.5 -> 0 0 1, then .9 and .6 win


def test_budget_from_a_ratio_or_a_token_count():
    # 1000x700 on 2x2 at side 24: 576 + 4 * 408 = 2208 vanilla image tokens.
    geometry = crop_geometry((1000, 700), (2, 2), 24)
    assert Budget.resolve(geometry, 0.25) == Budget(0.25, 2208)
    assert Budget.resolve(geometry, 0.25).image_tokens == 552
    assert Budget.resolve(geometry, visual_tokens=320) == Budget(320 / 2208, 2208, 320)
    assert Budget.resolve(geometry, visual_tokens=5000).keeps_all  # more than vanilla: everything
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            Budget.resolve(geometry, bad)
    with pytest.raises(ValueError, match="whole number >= 1"):
        Budget.resolve(geometry, visual_tokens=0)
