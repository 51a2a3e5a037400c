"""LLaVA-OneVision through the glue (`llava_arch`): `anyres_max_9` with `spatial_unpad` on the tiny
OneVision checkpoint (`python -m llava.tiny --family onevision`: SigLIP-384, 27x27 per view, Qwen2).
Vanilla token counts against `onevision_visual_token_count`, the canvas order by hand, the
sequence against LLaVA-VL's steps restated here, R = 1 = vanilla, methods on a downsampled canvas,
signals the SigLIP tower lacks refused before the model runs, in-LLM methods."""

import math

import pytest
import torch

from llava.mm_utils import ONEVISION_GRID_PINPOINTS, get_anyres_image_grid_shape, onevision_visual_token_count
from llava.model.builder import load_pretrained_model
from llava.model.compression import common
from llava.model.compression.registry import method_names

SIDE = 27
# Every grid 1x1..6x6 (an image of exactly the grid's pinpoint picks it), sizes that unpad, one whose
# canvas is downsampled (6x6: 162x162 -> 81x81), one just below the rule's 1.1 (4x3, unpadded to
# 108x108 cells: times = sqrt(11664 / 6561) = 1.33 -> downsampled too) and extreme aspect ratios.
GRID_SIZES = [(384 * grid_w, 384 * grid_h) for grid_w in range(1, 7) for grid_h in range(1, 7)]
OTHER_SIZES = [(800, 500), (2304, 2304), (1500, 1100), (1, 2000), (2000, 1), (2000, 3), (10, 10), (369, 820)]


@pytest.fixture(scope="module")
def onevision(tiny_onevision_checkpoint):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_onevision_checkpoint, device="cpu",
                                                           torch_dtype="float32")
    return tokenizer, model, processor


def _views(size, seed=0):
    """Random pixel views `[1 + C, 3, 384, 384]` for an image of PIL size `size` (the count is what matters)."""
    grid_w, grid_h = get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1 + grid_w * grid_h, 3, 384, 384, generator=generator)


def _encode(model, sizes, **compression):
    model.set_compression(**compression)
    try:
        return model.encode_image_sequences([_views(size, index) for index, size in enumerate(sizes)], sizes)
    finally:
        model.set_compression()


def test_vanilla_token_counts_equal_the_onevision_rule(onevision):
    _, model, _ = onevision
    sizes = GRID_SIZES + OTHER_SIZES
    for start in range(0, len(sizes), 8):  # a few images per call, so the tower's batch stays small
        chunk = sizes[start:start + 8]
        sequences = _encode(model, chunk, retention_ratio=1.0)
        for size, tokens, record in zip(chunk, sequences, model.last_accounting):
            expected = onevision_visual_token_count(size)
            assert tokens.shape[0] == record["tokens_before"] == record["tokens_after"] == expected, size
            assert record["image_tokens"] == record["vanilla_image_tokens"] == expected - record["newline_tokens"]
    # 2304x2304: 6x6 crops, 162x162 cells halved to 81x81; 800x500: 3x2 crops, 50x81 kept as it is.
    assert onevision_visual_token_count((2304, 2304)) == 729 + 81 * 82
    assert onevision_visual_token_count((800, 500)) == 729 + 50 * 82


def test_canvas_order_by_hand():
    """Features numbered by cell (view v's cell i is v * P + i): a 2x1 grid of side 3 whose image fills
    the middle canvas row only, then a 3x3 grid of side 2 downsampled from 6x6 to 2x2 cells."""
    newline = torch.tensor([-1.0])
    # 600x100 on a 3x6 canvas: int(100 * 6 / 600) = 1 row of image, (3 - 1) // 2 = 1 padding row each side.
    wide = common.crop_geometry((600, 100), (2, 1), 3, True, max_num_patches=9)
    cells = torch.arange(27.0).view(3, 9, 1)
    assert common.arrange_tokens(cells, common.keep_everything(wide), newline)[:, 0].tolist() == \
        [*range(9), 12, 13, 14, 21, 22, 23, -1]  # the thumbnail, crop 0's middle row, crop 1's, a newline
    square = common.crop_geometry((600, 600), (3, 3), 2, True, max_num_patches=1)
    assert square.downsampled_shape == (2, 2)  # times = sqrt(36 / 4) = 3
    cells = torch.arange(40.0).view(10, 4, 1)
    # Bilinear at scale 3 samples canvas rows/columns 1 and 4 exactly ((i + 0.5) * 3 - 0.5): cells
    # (1,1) = crop 0 cell 3 = 7, (1,4) = crop 2 cell 2 = 14, (4,1) = crop 6 cell 1 = 29, (4,4) = crop 8 cell 0 = 36.
    sequence = common.arrange_tokens(cells, common.keep_everything(square), newline)[:, 0].tolist()
    assert sequence == [0, 1, 2, 3, 7, 14, -1, 29, 36, -1]
    # Cell numbers (integers, as the selection records use) take the cell each sampling point falls in.
    integer = common.arrange_tokens(cells.long(), common.keep_everything(square), newline.long())[:, 0].tolist()
    assert integer == sequence
    selection = common.keep_everything(square)
    counts = selection.image_tokens, selection.newline_tokens("official"), selection.tokens_after("spatial")
    assert counts == (8, 2, 10)


def _reference_sequence(views, size, newline):
    """LLaVA-VL's `llava_arch` steps for one image, restated: crops as a [D, H, W] canvas, unpad (its
    `unpad_image`), bilinear downsampling when times > 1.1, a newline column, rows flattened, after the thumbnail."""
    grid_w, grid_h = get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384)
    dim = views.shape[-1]
    canvas = views[1:].view(grid_h, grid_w, SIDE, SIDE, dim).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    width, height = size
    current_height, current_width = canvas.shape[1:]
    if width / height > current_width / current_height:
        new_height = int(height * (current_width / width))
        padding = (current_height - new_height) // 2
        canvas = canvas[:, padding:current_height - padding, :]
    else:
        new_width = int(width * (current_height / height))
        padding = (current_width - new_width) // 2
        canvas = canvas[:, :, padding:current_width - padding]
    rows, cols = canvas.shape[1:]
    times = math.sqrt(rows * cols / (9 * SIDE**2))
    if times > 1.1:
        canvas = torch.nn.functional.interpolate(canvas[None], [int(rows // times), int(cols // times)],
                                                 mode="bilinear")[0]
    canvas = torch.cat([canvas, newline[:, None, None].expand(dim, canvas.shape[1], 1)], dim=-1)
    return torch.cat([views[0], canvas.flatten(1, 2).T])


@pytest.mark.parametrize("size", [(800, 500), (2304, 2304), (1500, 1100), (2000, 3)])
def test_vanilla_sequence_is_llava_vl_s(onevision, size):
    _, model, _ = onevision
    views = _views(size)
    with torch.no_grad():
        projected = model.encode_images(views).features
        (sequence,) = _encode(model, [size], retention_ratio=1.0)
    assert torch.equal(sequence, _reference_sequence(projected, size, model.get_model().image_newline))


def _runs_on_siglip(name):
    """Methods whose signals at R < 1 the SigLIP tower offers (the others are refused: see below)."""
    from llava.model.compression import get_method, parse_method_args
    from llava.model.multimodal_encoder.siglip_encoder import OFFERED_SIGNALS
    method = get_method(name)
    return method.signals_for(parse_method_args(name, []), False) <= OFFERED_SIGNALS


@pytest.mark.parametrize("name", method_names())
def test_full_budget_is_vanilla_or_refused(onevision, name):
    from llava.model.compression import get_method
    _, model, _ = onevision
    sizes = [(800, 500), (2304, 2304)]
    vanilla = _encode(model, sizes, retention_ratio=1.0)
    method = get_method(name)
    if not getattr(method.args(), "keeps_everything", lambda: True)() or method.input_changes(method.args()):
        pytest.skip(f"{name}'s default is not the model's vanilla at a full budget (its official code or input)")
    sequences = _encode(model, sizes, retention_ratio=1.0, method=name)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(sequences, vanilla))


@pytest.mark.parametrize("name", [name for name in method_names() if not _runs_on_siglip(name)])
def test_methods_needing_signals_siglip_lacks_are_refused_before_running(onevision, name):
    _, model, _ = onevision
    from llava.model.compression import get_method, parse_method_args
    missing = sorted(get_method(name).signals_for(parse_method_args(name, []), False))
    model.set_compression(retention_ratio=1.0)
    before = model.compression_settings()
    with pytest.raises(ValueError) as refused:
        model.set_compression(retention_ratio=0.25, method=name)
    message = str(refused.value)
    assert "\n" not in message and name in message and "SigLIP" in message
    assert any(signal in message for signal in missing)
    assert model.compression_settings() == before  # the refused settings were not kept
    model.set_compression()


def test_globalcom2_is_refused_naming_the_cls_signal(onevision):
    _, model, _ = onevision
    if _runs_on_siglip("globalcom2"):
        pytest.skip("GlobalCom2's default score no longer needs [CLS]")
    with pytest.raises(ValueError, match=r"globalcom2 needs cls_logits_last.*SigLIP.*--method-arg score=neg_cos_mean"):
        model.set_compression(retention_ratio=0.25, method="globalcom2")
    with pytest.raises(ValueError, match=r"--method-arg globalcom2.score=neg_cos_mean"):
        model.set_compression(retention_ratio=0.25, method="globalcom2+fastv")


NEG_COS_MEAN = ["score=neg_cos_mean"]


@pytest.mark.parametrize("size, scale, vanilla", [((2304, 2304), 81 * 81 / (162 * 162), 729 + 81 * 81),
                                                  ((800, 500), 1.0, 729 + 50 * 81)])
def test_globalcom2_keeps_its_rule_on_a_downsampled_and_a_whole_canvas(onevision, size, scale, vanilla):
    """GlobalCom2 at R = 0.25: int(729 R) = 182 thumbnail tokens; crop c keeps int(N_c r_c f), r_c the
    released softmax ratios of the thumbnail's neg_cos_mean scores and f the canvas's downsampling factor
    (2304x2304: 162x162 cells sent as 81x81, f = 1/4; 800x500 sent whole, f = 1)."""
    from llava.model.compression.globalcom2 import generate_scale_for_crop_features
    _, model, _ = onevision
    views = _views(size)
    model.set_compression(retention_ratio=0.25, method="globalcom2", method_args=NEG_COS_MEAN)
    try:
        (tokens,) = model.encode_image_sequences([views], [size])
        scores = model.encode_images(views, {"neg_cos_mean"}).signals["neg_cos_mean"]
    finally:
        model.set_compression()
    record = model.last_accounting[0]
    grid_w, grid_h = get_anyres_image_grid_shape(size, ONEVISION_GRID_PINPOINTS, 384)
    ratios = generate_scale_for_crop_features(scores[0], grid_w, grid_h, 0.25)
    assert record["crop_ratios"] == [round(ratio, 6) for ratio in ratios]
    assert record["thumbnail_kept"] == int(729 * 0.25) == 182
    assert record["crop_kept"] == [int(valid * ratio * scale) for valid, ratio in zip(record["crop_valid"], ratios)]
    assert record.get("canvas_scale", 1.0) == scale and tokens.shape[0] == record["tokens_after"]
    # Sent image tokens against R x vanilla's: each view's int() floors less than one token; on
    # 2304x2304 every crop is whole, so sum N_c r_c f is exactly R * 81 * 81 (no ratio clips at 1);
    # 800x500's padding-cut crops weigh the ratios unequally: within 1% there.
    assert record["vanilla_image_tokens"] == vanilla
    if scale < 1.0:
        assert 0.25 * vanilla - (1 + grid_w * grid_h) < record["image_tokens"] <= 0.25 * vanilla
    assert abs(record["image_tokens"] - 0.25 * vanilla) <= 0.01 * vanilla


@pytest.mark.parametrize("size", [(2304, 2304), (800, 500)])
def test_globalcom2_exact_budget_sends_round_r_of_vanilla(onevision, size):
    from llava.model.compression.globalcom2 import visual_token_count
    _, model, _ = onevision
    (tokens,) = _encode(model, [size], retention_ratio=0.25, method="globalcom2",
                        method_args=NEG_COS_MEAN + ["budget=exact"])
    record = model.last_accounting[0]
    assert record["image_tokens"] == round(0.25 * record["vanilla_image_tokens"])
    assert tokens.shape[0] == visual_token_count(size, ONEVISION_GRID_PINPOINTS, 0.25, side=27, crop_size=384,
                                                 max_num_patches=9)


def test_globalcom2_batched_equals_per_sample_and_full_budget_is_vanilla(onevision):
    _, model, _ = onevision
    sizes = [(2304, 2304), (800, 500), (1500, 1100)]
    views = [_views(size, index) for index, size in enumerate(sizes)]
    model.set_compression(retention_ratio=0.25, method="globalcom2", method_args=NEG_COS_MEAN)
    try:
        batched = model.encode_image_sequences(views, sizes)
        alone = [model.encode_image_sequences([image], [size])[0] for image, size in zip(views, sizes)]
    finally:
        model.set_compression()
    assert all(torch.allclose(ours, theirs, atol=1e-5) for ours, theirs in zip(batched, alone))
    assert [tokens.shape[0] for tokens in batched] != [onevision_visual_token_count(size) for size in sizes]
    vanilla = _encode(model, sizes, retention_ratio=1.0)
    full = _encode(model, sizes, retention_ratio=1.0, method="globalcom2", method_args=NEG_COS_MEAN)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(full, vanilla))


@pytest.mark.parametrize("name", ["random", "pooling"])
def test_methods_on_a_downsampled_canvas_keep_r_of_vanilla(onevision, name):
    """On 2304x2304 (81x81 of 162x162 cells sent vanilla) a method selects cells of the full views with a
    budget of round(R * vanilla image tokens), sent at their full-canvas places (a newline per canvas row)."""
    _, model, _ = onevision
    (tokens,) = _encode(model, [(2304, 2304)], retention_ratio=0.25, method=name, token_layout="spatial")
    record = model.last_accounting[0]
    vanilla = 729 + 81 * 81
    assert record["vanilla_image_tokens"] == vanilla and record["tokens_before"] == vanilla + 81
    assert abs(record["image_tokens"] - round(0.25 * vanilla)) <= 0.02 * vanilla
    assert record["newline_tokens"] == 162 and tokens.shape[0] == record["tokens_after"]
    assert "downsampled_canvas" not in record


@pytest.mark.parametrize("name", ["random", "pooling"])
def test_methods_on_a_canvas_kept_whole(onevision, name):
    _, model, _ = onevision
    (tokens,) = _encode(model, [(800, 500)], retention_ratio=0.25, method=name)
    record = model.last_accounting[0]
    assert record["vanilla_image_tokens"] == 729 + 50 * 81 and tokens.shape[0] == record["tokens_after"]
    assert 0.2 < record["realised_ratio"] < 0.3


def test_in_llm_method_runs_and_is_vanilla_at_full_budget(onevision):
    tokenizer, model, _ = onevision
    views, size = _views((2304, 2304)), (2304, 2304)
    prompt = torch.tensor([tokenizer("<|im_start|>user\n").input_ids + [-200] + tokenizer("Hi<|im_end|>").input_ids])
    logits = {}
    for key, compression in (("vanilla", dict(retention_ratio=1.0)),
                             ("full", dict(retention_ratio=1.0, method="fastv")),
                             ("pruned", dict(retention_ratio=0.25, method="fastv", method_args=["k=1"]))):
        model.set_compression(**compression)
        try:
            with torch.no_grad():
                logits[key] = model(input_ids=prompt, images=[views], image_sizes=[size]).logits
        finally:
            model.set_compression()
        if key == "pruned":
            record = model.last_accounting[0]
            assert record["in_llm"]["span_tokens"] == onevision_visual_token_count(size)
            assert record["post_pruning_image_tokens"] < record["in_llm"]["span_tokens"]
    assert torch.equal(logits["full"], logits["vanilla"])
    assert not torch.equal(logits["pruned"], logits["vanilla"])
