"""The shared parts of every method: the budget and how counts are apportioned."""

import pytest
import torch

from llava.model.compression.common import (
    Budget, Merge, apportion, arrange_tokens, crop_geometry, project_merge, selection_from_mask, selection_from_record,
    selection_record,
)


def test_apportion_caps_and_redistributes():
    assert apportion(10, [1.0, 1.0, 1.0], [2, 10, 10]) == [2, 4, 4]  # 3.33 > cap 2: the rest split 4 / 4
    assert apportion(7, [0.0, 0.0], [5, 5]) == [4, 3]                 # no weight: equal shares, remainder low first
    assert apportion(50, [1.0, 3.0], [4, 30]) == [4, 30]              # more than the caps: everything
    assert apportion(3, [0.2, 0.3, 0.5], [9, 9, 9]) == [1, 1, 1]      # .6 .9 1.5 -> 0 0 1, then .9 and .6 win


def test_budget_from_a_ratio_or_a_token_count():
    # 1000x700 on 2x2 at side 24: 576 + 4 * 408 = 2208 vanilla image tokens.
    geometry = crop_geometry((1000, 700), (2, 2), 24)
    assert Budget.resolve(geometry, 0.25) == Budget(0.25, 2208, model_vanilla_image_tokens=2208)
    assert Budget.resolve(geometry, 0.25).image_tokens == 552
    assert Budget.resolve(geometry, visual_tokens=320) == Budget(320 / 2208, 2208, 320, 2208)
    # A method's official input without unpadding (2880 cells) keeps LLaVA-NeXT's 2208 as N_van,
    # unless the glue names the model's own count (a forced grid: another image size's).
    padded = crop_geometry((1000, 700), (2, 2), 24, unpad=False)
    budget = Budget.resolve(padded, 0.25)
    assert (budget.vanilla_image_tokens, budget.model_vanilla_image_tokens) == (2880, 2208)
    assert Budget.resolve(padded, 0.25, model_vanilla_image_tokens=2160).model_vanilla_image_tokens == 2160
    assert Budget.resolve(geometry, visual_tokens=5000).keeps_all  # more than vanilla: everything
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            Budget.resolve(geometry, bad)
    with pytest.raises(ValueError, match="whole number >= 1"):
        Budget.resolve(geometry, visual_tokens=0)


# --- a method's own sequence, extra tokens, merges in the tower's space --------------------------------
#
# A 2x1 grid of side-2 views on a 4x2 image (no padding): V = 3 views of P = 4 cells, cell
# `view * 4 + patch` named by its number; newline -1, extra tokens named 100 + e.

def _named_views():
    return torch.arange(12, dtype=torch.float32).view(3, 4, 1)


def _own_order_merge(**fields):
    geometry = crop_geometry((4, 2), (2, 1), 2)
    keep = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)  # cells 0, 3 | 5 | 8, 10
    # Official order: the thumbnail's cells best first (3, 0), its extra token, the crops' cells,
    # then the second extra token; no newline anywhere.
    sequence = torch.tensor([3, 0, 12, 5, 10, 8, 13])
    extra_features = torch.tensor([[100.0], [101.0]])
    return selection_from_mask(geometry, keep, [2, 1, 2], kind=Merge, sequence=sequence,
                               extra_features=extra_features, **fields)


def test_own_sequence_names_cells_extra_tokens_and_newlines():
    merge = _own_order_merge()
    tokens = arrange_tokens(_named_views(), merge, torch.tensor([-1.0]), "official")
    assert tokens[:, 0].tolist() == [3, 0, 100, 5, 10, 8, 101]
    record = merge.accounting("official")
    counts = (record["image_tokens"], record["extra_tokens"], record["newline_tokens"], record["tokens_after"])
    assert counts == (7, 2, 0, 7)
    # The spatial layout: LLaVA-NeXT's raster arrangement (a newline after each of the 2 image
    # rows), then the extra tokens.
    spatial = arrange_tokens(_named_views(), merge, torch.tensor([-1.0]), "spatial")
    assert spatial[:, 0].tolist() == [0, 3, 5, 8, -1, 10, -1, 100, 101]
    assert merge.accounting("spatial")["tokens_after"] == 9


def test_own_sequence_newlines_and_merged_features():
    merge = _own_order_merge(features=torch.tensor([[50.0], [53.0], [55.0], [58.0], [60.0]]))
    merge.sequence = torch.tensor([3, 0, 12, -1, 5, 10, 8, 13])
    tokens = arrange_tokens(_named_views(), merge, torch.tensor([-1.0]), "official")
    # Kept cells take the merged features of their canonical rank (0, 3, 5, 8, 10 -> rows 0..4).
    assert tokens[:, 0].tolist() == [53, 50, 100, -1, 55, 60, 58, 101]
    assert merge.accounting("official")["newline_tokens"] == 1


def test_own_sequence_round_trips_through_the_selection_record():
    merge = _own_order_merge()
    record = selection_record(merge, "official")
    assert record["arrangement"] == "sequence" and record["sequence"] == [3, 0, 12, 5, 10, 8, 13]
    assert record["kept"] == [[3, 0], [1], [2, 0]] and record["image_tokens"] == 7 and record["extra_tokens"] == 2
    restored = selection_from_record(record)
    assert torch.equal(restored.sequence, merge.sequence) and restored.kept_cells == 5


def test_a_tower_space_merge_is_projected_before_it_is_arranged():
    merge = _own_order_merge(features=torch.ones(5, 3), feature_space="tower")
    merge.extra_features = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="project_merge"):
        arrange_tokens(_named_views(), merge, None, "official")
    projected = project_merge(merge, lambda features: features.sum(dim=1, keepdim=True) + 7)
    assert projected.feature_space == "projected" and merge.feature_space == "tower"  # a new object
    tokens = arrange_tokens(_named_views(), projected, None, "official")
    assert tokens[:, 0].tolist() == [10, 10, 7, 10, 10, 10, 7]
    plain = selection_from_mask(crop_geometry((4, 2), (2, 1), 2), torch.ones(3, 4, dtype=torch.bool), [4, 4, 4])
    assert project_merge(plain, None) is plain
