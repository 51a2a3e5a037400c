"""AnyRes geometry, preprocessing, image loading and prompt tokenisation (values checkable by hand)."""

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from llava.mm_utils import (
    ImageLoadError,
    KeywordsStoppingCriteria,
    anyres_visual_token_count,
    divide_to_patches,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
    unpad_image,
    unpadded_bounds,
)

V16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize(
    "size, expected",
    [
        ((800, 500), (672, 672)),   # 672/800 = 0.84 keeps 672x420, more than any other candidate
        ((500, 900), (672, 672)),   # 0.7467 -> 373x672 beats 336x1008's 336x604
        ((1000, 300), (1008, 336)), # 1.008 -> effective capped at 1000*300
        ((300, 1000), (336, 1008)),
        ((100, 100), (336, 672)),   # every candidate keeps all 10000 px; ties -> least waste -> first
        ((336, 336), (336, 672)),   # (336,672) and (672,336) tie exactly; the first wins
        ((2000, 20), (1008, 336)),
    ],
)
def test_select_best_resolution(size, expected):
    assert select_best_resolution(size, V16) == expected


def test_pinpoints_as_string():
    assert select_best_resolution((800, 500), str(V16)) == (672, 672)


@pytest.mark.parametrize("size, grid", [((800, 500), (2, 2)), ((1000, 300), (3, 1)), ((100, 100), (1, 2)), ((20, 2000), (1, 3))])
def test_grid_shape(size, grid):
    assert get_anyres_image_grid_shape(size, V16, 336) == grid


@pytest.mark.parametrize(
    "size, canvas, bounds",
    [
        ((800, 500), (48, 48), (9, 39, 0, 48)),   # new_h = int(500*48/800) = 30, pad 9
        ((500, 900), (48, 48), (0, 48, 11, 37)),  # new_w = int(500*48/900) = 26, pad 11
        ((1, 1), (48, 24), (12, 36, 0, 24)),      # wider than the 1x2 canvas: new_h = 24
        ((20, 2000), (72, 24), (0, 72, 12, 12)),  # new_w = int(0.72) = 0: nothing is image
        ((672, 672), (48, 48), (0, 48, 0, 48)),
    ],
)
def test_unpadded_bounds(size, canvas, bounds):
    assert unpadded_bounds(size, *canvas) == bounds


def test_unpad_image_slices_the_canvas():
    canvas = torch.arange(48 * 48).view(1, 48, 48)
    assert torch.equal(unpad_image(canvas, (800, 500)), canvas[:, 9:39, :])
    assert torch.equal(unpad_image(canvas, (500, 900)), canvas[:, :, 11:37])


@pytest.mark.parametrize(
    "size, tokens",
    [((800, 500), 576 + 30 * 49), ((500, 900), 576 + 48 * 27), ((20, 2000), 576 + 72 * 1), ((1, 1), 576 + 24 * 25), ((672, 672), 576 + 48 * 49)],
)
def test_visual_token_count(size, tokens):
    assert anyres_visual_token_count(size, V16) == tokens


def test_800x500_is_2046_tokens():
    assert anyres_visual_token_count((800, 500), V16) == 2046


def test_resize_and_pad_centres_on_black():
    image = Image.new("RGB", (800, 500), (200, 100, 50))
    padded = np.asarray(resize_and_pad_image(image, (672, 672)))
    # width 672, height ceil(500 * 0.84) = 420, pasted at y = (672 - 420) // 2 = 126
    assert padded.shape == (672, 672, 3)
    assert (padded[:126] == 0).all() and (padded[126 + 420:] == 0).all()
    assert (padded[126:126 + 420] == (200, 100, 50)).all()


def test_divide_to_patches_is_row_major():
    image = Image.new("RGB", (672, 672))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for index, colour in enumerate(colours):
        top, left = divmod(index, 2)
        image.paste(colour, (left * 336, top * 336, left * 336 + 336, top * 336 + 336))
    crops = divide_to_patches(image, 336)
    assert [crop.getpixel((0, 0)) for crop in crops] == colours
    assert all(crop.size == (336, 336) for crop in crops)


class _Config:
    def __init__(self, aspect):
        self.image_aspect_ratio = aspect
        self.image_grid_pinpoints = V16


def test_process_images_anyres_shapes(tiny):
    _, _, processor = tiny
    images = [Image.new("RGB", (800, 500)), Image.new("RGB", (500, 900))]
    pixel_values = process_images(images, processor, _Config("anyres"))
    assert pixel_values.shape == (2, 5, 3, 336, 336)
    mixed = process_images([Image.new("RGB", (800, 500)), Image.new("RGB", (1000, 300))], processor, _Config("anyres"))
    assert isinstance(mixed, list) and [v.shape[0] for v in mixed] == [5, 4]
    assert process_images(images, processor, _Config("pad")).shape == (2, 3, 336, 336)


def test_one_image_is_its_views_preprocessed_one_by_one(tiny):
    """One preprocess call for all views, and no stacking copy for one image: the same values as each
    view preprocessed alone, C-contiguous (numpy's `astype` keeps a transposed layout unless told)."""
    _, _, processor = tiny
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (500, 800, 3), dtype=np.uint8))
    pixel_values = process_images([image], processor, _Config("anyres"))
    crops = divide_to_patches(resize_and_pad_image(image, select_best_resolution(image.size, V16)), 336)
    views = [image.resize((336, 336)), *crops]
    alone = torch.stack([processor.preprocess(view, return_tensors="pt")["pixel_values"][0] for view in views])
    assert pixel_values.shape == (1, 5, 3, 336, 336) and torch.equal(pixel_values[0], alone)
    assert pixel_values.is_contiguous()


def test_thumbnail_is_the_squashed_image(tiny):
    _, _, processor = tiny
    image = Image.new("RGB", (800, 500))
    image.paste((255, 255, 255), (0, 0, 400, 500))  # left half white
    thumbnail = process_images([image], processor, _Config("anyres"))[0, 0]
    white = (1 - processor.image_mean[0]) / processor.image_std[0]
    black = (0 - processor.image_mean[0]) / processor.image_std[0]
    assert thumbnail[0, :, :160].allclose(torch.tensor(white), atol=1e-5)
    assert thumbnail[0, :, 176:].allclose(torch.tensor(black), atol=1e-5)


def test_palette_images_are_resized_in_their_own_mode(tiny):
    """Upstream passes ScienceQA's palette PNGs unconverted: PIL resizes them with nearest
    neighbour, so a two-colour checkerboard stays two-coloured (bicubic on RGB would blend)."""
    _, _, processor = tiny
    checkerboard = Image.fromarray(((np.indices((100, 100)).sum(axis=0) // 7) % 2 * 255).astype(np.uint8)).convert("P")
    assert checkerboard.mode == "P"
    as_given = process_images([checkerboard], processor, _Config("anyres"))[0, 0]
    converted = process_images([checkerboard.convert("RGB")], processor, _Config("anyres"))[0, 0]
    assert len(torch.unique(as_given[0])) == 2 and len(torch.unique(converted[0])) > 2
    assert process_images([checkerboard], processor, _Config("pad")).shape == (1, 3, 336, 336)


# -- image loading ------------------------------------------------------------------------------

def _save(image, path):
    image.save(path)
    return str(path)


def test_missing_image_names_file_and_question(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png.*question 7"):
        load_image(tmp_path / "nope.png", question=7)


def test_corrupt_image_names_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        load_image(path)


@pytest.mark.parametrize("loads_truncated", [False, True])
def test_truncated_png_names_file(tmp_path, monkeypatch, loads_truncated):
    """Also where another library allows truncated files for the whole process (lmms-eval sets PIL's
    LOAD_TRUNCATED_IMAGES when imported); the flag is left as that library set it."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", loads_truncated)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is loads_truncated


@pytest.mark.parametrize(
    "image, pixel",
    [
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as upstream
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),          # 16-bit rescaled, not clipped
        (Image.new("I;16", (4, 4), 32896), (128, 128, 128)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
    ],
)
def test_modes_become_rgb(tmp_path, image, pixel):
    loaded = load_image(_save(image, tmp_path / f"x.{'tiff' if image.mode in ('CMYK', 'I;16') else 'png'}"))
    assert loaded.mode == "RGB" and loaded.getpixel((1, 1)) == pixel


def test_palette_image(tmp_path):
    image = Image.new("P", (4, 4), 3)
    image.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2, 40, 50, 60] + [0] * 756)
    assert load_image(_save(image, tmp_path / "p.png")).getpixel((0, 0)) == (40, 50, 60)


# -- text ---------------------------------------------------------------------------------------

class CharTokenizer:
    """One id per character (its code point), BOS = 1 prepended to every call, like Llama's."""

    bos_token_id = 1

    def __call__(self, text):
        class Encoding:
            input_ids = [1] + [ord(c) for c in text]
        return Encoding()


def test_tokenizer_image_token_by_hand():
    assert tokenizer_image_token("ab<image>\ncd", CharTokenizer()) == [1, 97, 98, -200, 10, 99, 100]
    assert tokenizer_image_token("<image>x<image>", CharTokenizer()) == [1, -200, 120, -200]
    ids = tokenizer_image_token("a<image>b", CharTokenizer(), return_tensors="pt")
    assert ids.dtype == torch.long and ids.tolist() == [1, 97, -200, 98]


def test_tokenizer_image_token_with_llama_style_tokenizer(tiny):
    tokenizer = tiny[0]
    ids = tokenizer_image_token("USER: <image>\nWhat is shown? ASSISTANT:", tokenizer)
    image_at = ids.index(-200)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # The later piece is tokenised alone, so it starts with a lone word-start marker, then the
    # newline byte, exactly as Llama's tokenizer does on "\nWhat ...".
    assert tokenizer.convert_ids_to_tokens(ids[image_at + 1:image_at + 3]) == ["▁", "<0x0A>"]
    assert ids[:image_at] == tokenizer("USER: ").input_ids


def test_keywords_stopping_criteria(tiny):
    tokenizer = tiny[0]
    prompt = torch.tensor([[1, 5, 6]])
    criteria = KeywordsStoppingCriteria(["</s>", "###"], tokenizer, prompt)
    ends_with_keyword = torch.tensor([tokenizer("the sky ###").input_ids[1:]])
    plain = torch.tensor([tokenizer("the sky is blue").input_ids[1:]])
    assert criteria(ends_with_keyword, None).tolist() == [True]
    assert criteria(plain, None).tolist() == [False]


def test_model_name_from_path():
    assert get_model_name_from_path("liuhaotian/llava-v1.6-vicuna-7b/") == "llava-v1.6-vicuna-7b"
    assert get_model_name_from_path("runs/llava-x/checkpoint-200") == "llava-x_checkpoint-200"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000))
def test_anyres_rules_hold_for_every_size(width, height):
    best = select_best_resolution((width, height), V16)
    assert list(best) in V16
    grid_w, grid_h = get_anyres_image_grid_shape((width, height), V16, 336)
    top, bottom, left, right = unpadded_bounds((width, height), grid_h * 24, grid_w * 24)
    # The unpadded area lies inside the canvas and is padded symmetrically on one axis only.
    assert 0 <= top <= bottom <= grid_h * 24 and 0 <= left <= right <= grid_w * 24
    assert (top, left) == (0, 0) or top == grid_h * 24 - bottom or left == grid_w * 24 - right
    assert top == 0 or left == 0
