"""Selection records: the kept patches of each view in the order the language model receives
them, counts, provenance for merges, and the way back to a selection that arranges the same."""

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llava.model.compression import globalcom2, pooling, random
from llava.model.compression.common import (
    Budget, Selection, arrange_tokens, crop_geometry, keep_mask, selection_from_record, selection_record,
)

SIDE = 6


def _named_views(geometry) -> torch.Tensor:
    """`[V, P, 1]` features whose values name their cells (`view * P + patch`)."""
    views = 1 + geometry.num_crops
    return torch.arange(views * SIDE**2).view(views, SIDE**2, 1)


def _select(method: str, size=(1000, 600), grid=(2, 2), ratio=0.3, unpad=True, **args):
    geometry = crop_geometry(size, grid, SIDE, unpad)
    views = torch.randn(1 + geometry.num_crops, SIDE**2, 4, generator=torch.Generator().manual_seed(0))
    budget = Budget.resolve(geometry, ratio)
    if method == "globalcom2":
        scores = torch.randn(1 + geometry.num_crops, SIDE**2, generator=torch.Generator().manual_seed(1))
        return globalcom2.select_tokens(scores, geometry, budget, globalcom2.GlobalCom2Args(**args))
    return {"random": random.select, "pooling": pooling.select}[method](views, {}, geometry, budget)


def _sequence(selection, layout: str) -> list[int]:
    """The cells the LLM receives, in order, -1 for a newline (a merge's tokens named by their cells)."""
    positions = Selection(**{field.name: getattr(selection, field.name) for field in dataclasses.fields(Selection)})
    return arrange_tokens(_named_views(selection.geometry), positions, torch.tensor([-1]), layout)[:, 0].tolist()


def test_raster_record_lists_each_views_kept_patches_in_raster_order():
    selection = _select("random")
    record = selection_record(selection, "spatial")
    assert record["kept"][0] == sorted(selection.thumbnail_indices.tolist())
    for crop, kept in enumerate(record["kept"][1:]):
        assert kept == selection.crop_keep_mask[crop].nonzero()[:, 0].tolist()
    accounting = selection.accounting("spatial")
    assert (record["image_tokens"], record["newline_tokens"]) == (accounting["image_tokens"], accounting["newline_tokens"])
    assert (record["image_size"], record["grid"], record["side"], record["unpad"]) == ([1000, 600], [2, 2], SIDE, True)
    assert (record["arrangement"], record["layout"], "sources" not in record) == ("raster", "spatial", True)


def test_packed_record_keeps_the_thumbnails_score_order():
    selection = _select("globalcom2")
    record = selection_record(selection, "official")
    assert record["arrangement"] == "packed"
    assert record["kept"][0] == selection.thumbnail_indices.tolist() != sorted(record["kept"][0])
    # Each crop's tokens land at cells numbered by their packed index: still ascending within the crop.
    assert all(kept == sorted(kept) for kept in record["kept"][1:])
    assert selection_record(selection, "spatial")["kept"][0] == sorted(record["kept"][0])


@pytest.mark.parametrize("method, layout, args", [
    ("random", "official", {}), ("globalcom2", "official", {}), ("globalcom2", "spatial", {}),
    ("pooling", "official", {}), ("globalcom2", "official", {"views": "thumbnail"}),
    ("globalcom2", "official", {"views": "crops"}),
])
def test_record_is_the_sequence_and_arranges_back_to_it(method, layout, args):
    selection = _select(method, **args)
    record = json.loads(json.dumps(selection_record(selection, layout)))  # JSON-ready, and read back
    sequence = _sequence(selection, layout)
    per_view = [[cell % SIDE**2 for cell in sequence if cell >= 0 and cell // SIDE**2 == view]
                for view in range(1 + selection.geometry.num_crops)]
    assert record["kept"] == per_view
    assert (record["image_tokens"], record["newline_tokens"]) == (sum(map(len, per_view)), sequence.count(-1))
    assert _sequence(selection_from_record(record), layout) == sequence


def test_a_thumbnail_only_run_records_no_crop_and_no_newline():
    record = selection_record(_select("globalcom2", views="thumbnail"), "official")
    assert record["send_crops"] is False and record["newline_tokens"] == 0
    assert record["kept"][1:] == [[]] * 4 and len(record["kept"][0]) == int(SIDE**2 * 0.3)


def test_single_view_record():
    selection = _select("random", size=(50, 40), grid=(0, 0), ratio=0.5)
    record = selection_record(selection, "official")
    assert record["grid"] is None and len(record["kept"]) == 1 and record["newline_tokens"] == 1
    assert record["image_tokens"] == 18 and record["kept"][0] == sorted(selection.thumbnail_indices.tolist())
    assert _sequence(selection_from_record(record), "official") == _sequence(selection, "official")


def test_merge_record_names_the_sources_of_each_kept_token():
    merge = _select("pooling", ratio=0.25)
    record = selection_record(merge, "official")
    windows = merge.source_map.flatten()
    canonical = keep_mask(merge).flatten().nonzero()[:, 0].tolist()  # kept cells in canonical order
    for view, (kept, sources) in enumerate(zip(record["kept"], record["sources"])):
        assert len(sources) == len(kept)
        for patch, cells in zip(kept, sources):
            cell = view * SIDE**2 + patch
            assert cell == min(cells)  # the token sits at its window's top-left cell
            assert cells == (windows == canonical.index(cell)).nonzero()[:, 0].tolist()
    merged = sorted(cell for view in record["sources"] for cells in view for cell in cells)
    assert merged == (windows >= 0).nonzero()[:, 0].tolist()  # every image cell, once


def test_everything_kept_is_recorded_in_raster_order():
    selection = _select("globalcom2", ratio=1.0)
    record = selection_record(selection, "official")
    assert record["arrangement"] == "raster" and record["kept"][0] == list(range(SIDE**2))
    assert record["image_tokens"] == selection.geometry.vanilla_image_tokens


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), grid_w=st.integers(1, 3), grid_h=st.integers(1, 3),
       ratio=st.floats(0.01, 1.0), method=st.sampled_from(["globalcom2", "random", "pooling"]),
       layout=st.sampled_from(["official", "spatial"]), unpad=st.booleans())
def test_record_round_trips_for_every_shape(width, height, grid_w, grid_h, ratio, method, layout, unpad):
    selection = _select(method, (width, height), (grid_w, grid_h), ratio, unpad)
    record = selection_record(selection, layout)
    sequence = _sequence(selection, layout)
    assert record["image_tokens"] + record["newline_tokens"] == len(sequence) == selection.tokens_after(layout)
    assert _sequence(selection_from_record(record), layout) == sequence
