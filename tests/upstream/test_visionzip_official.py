"""Our VisionZip (`mode=faithful`, the default) against the official VisionZip code (`dvlab-research/VisionZip`,
a monkey-patch of stock LLaVA 1.2.x), both run for real on the tiny LLaVA-NeXT checkpoint: does the language
model get the same visual tokens, in the same order, bit for bit?

Each case is one drawn image (`compare_released.case_image`; sizes covering the v1.6 grids 2x1, 1x2, 2x2, 3x1,
1x3 and odd sizes with padding) at one official setting `(dominant, contextual)`: the README's 54 + 10, the
paper's 108 + 20 and 162 + 30, and 27 + 5, 49 + 9, 122 + 22. The official side is `visionzip(model,
dominant=..., contextual=...)` applied to stock LLaVA by the upstream interpreter (`visionzip_probe.py`, whose
docstring says the one setting it adapts to the tiny tower's depth). Ours is the same tokens per view at the
equivalent budget of the spec (`shared/spec/baselines/visionzip.md`, section 5): `R = (dominant + contextual)
/ 576`, which our split `contextual = max(1, round(10 N / 64))` must turn back into the same pair. Both load
the same fp16 weights; fp32 upcasts them on both sides. Per case and tower numerics:

- `same_positions`: the spans name the same tower rows in the same order, each row named on its own side
  (`span_labels`: the layer -2 row it was projected from, [CLS] rows included, or CONTEXTUAL for a merged
  token), so this does not depend on the two sides rounding alike; `only_kept`: tower rows only one side sends;
- `bit_identical`, `max_abs_diff` of the whole spans; `bit_identical_unmerged` over the rows that are tower
  rows on the official side ([CLS] and dominant tokens), `max_abs_diff_contextual` over its merged tokens.

Measured (tiny checkpoint, CPU, `visionzip_cases(30)`): `released` numerics bit-identical 30/30 in fp16; in fp32
same positions and unmerged rows bit-identical 30/30, but no case bit-identical: the merged tokens' member sum
is accumulated in another order (ours one `index_add_`, theirs a one-hot `bmm`, `clip_encoder.py:77`), up to
1.9e-6 apart after the projector. `sdpa` numerics: never bit-identical; same positions 18/30 in fp16, 30/30 in
fp32.

Slow, and skipped unless both are found: the official code (a checkout or mirror at `VISIONZIP_REPO`, else
the mirror below; its `visionzip/` exported with git archive) and the upstream interpreter
(`LLAVA_UPSTREAM_PYTHON`, else `.venv-upstream`; `sh scripts/install.sh upstream`).
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.conversation import first_turn_prompt
from llava.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

REPO = Path(__file__).resolve().parents[2]
if "compare_released" not in sys.modules:  # tools/ is no package: load it as tests/tools does
    _SPEC = importlib.util.spec_from_file_location("compare_released", REPO / "tools" / "compare_released.py")
    sys.modules["compare_released"] = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(sys.modules["compare_released"])
compare_released = sys.modules["compare_released"]

PROBE = Path(__file__).with_name("visionzip_probe.py")
DEFAULT_REPO = "/work/.mirror/dvlab-research+VisionZip/repo"
PATCHES = 576  # per view: the official code's per-view token counts are out of CLIP-336's 24 x 24
# (dominant, contextual) as `visionzip(model, dominant, contextual)` takes them; dominant counts the [CLS] token
SETTINGS = [(54, 10), (108, 20), (162, 30), (27, 5), (49, 9), (122, 22)]
CONTEXTUAL = -3  # span label of a merged token, which is no row of the tower
NEWLINE, UNMATCHED = compare_released.NEWLINE, compare_released.UNMATCHED

pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Case:
    index: int
    width: int
    height: int
    dominant: int
    contextual: int

    @property
    def ratio(self) -> float:
        """Our budget for the official setting: each view sends `round(576 R)` tokens (spec, section 5)."""
        return float(Fraction(self.dominant + self.contextual, PATCHES))


def visionzip_cases(count: int) -> list[Case]:
    """The first `count` cases: case i has size i mod 10 of `compare_released.IMAGE_SIZES` and setting
    (i + i // 10) mod 6 of `SETTINGS`, so any prefix cycles through the sizes and the settings."""
    sizes = compare_released.IMAGE_SIZES
    return [Case(index, *sizes[index % len(sizes)], *SETTINGS[(index + index // len(sizes)) % len(SETTINGS)])
            for index in range(count)]


def span_labels(span: torch.Tensor, projector_inputs: torch.Tensor, projector_outputs: torch.Tensor,
                tower_rows: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """What each row of an image span `[M, D]` is, `[M]` int64: `v * (1 + P) + r` for row r of view v's
    tower output `tower_rows` `[V, 1 + P, C]` (r = 0: its [CLS] token, 1 + p: patch p), CONTEXTUAL for a
    projected token that is no tower row (a merged one), NEWLINE for `newline` `[D]`, UNMATCHED for anything
    else. `projector_inputs` `[n, C]` -> `projector_outputs` `[n, D]`: every projector call of the run, row
    by row. A span row is named by the projector output it equals, that output by its input. A merged token
    without members is its target's own row (the official code adds a zero mean), and is named by that row."""
    output_index = compare_released.kept_positions(span, projector_outputs[None], newline)
    never_a_row = torch.full_like(tower_rows[0, 0], torch.inf)
    sources = compare_released.kept_positions(projector_inputs, tower_rows.flatten(0, 1)[None], never_a_row)
    sources = torch.where(sources == UNMATCHED, CONTEXTUAL, sources)
    return torch.where(output_index >= 0, sources[output_index.clamp(min=0)], output_index)


def run_official(upstream_python: str, official_code: str, checkpoint: str, cases: list[Case],
                 image_files: list[str], dtype: str, work: str) -> dict:
    """The probe's output (`visionzip_probe.py`) for every case, in one run of the upstream interpreter."""
    request = {"dtype": dtype, "conv_mode": compare_released.CONV_MODE, "user_turn": compare_released.USER_TURN,
               "cases": [[image_file, case.dominant, case.contextual] for case, image_file in zip(cases, image_files)],
               "out": os.path.join(work, f"official-{dtype}.pt")}
    request_file = os.path.join(work, f"request-{dtype}.json")
    with open(request_file, "w") as handle:
        json.dump(request, handle)
    run = subprocess.run([upstream_python, str(PROBE), request_file], cwd=checkpoint, capture_output=True, text=True,
                         env=compare_released.upstream_environment(official_code), timeout=600)
    assert run.returncode == 0, f"the VisionZip probe failed:\n{run.stderr[-4000:]}"
    output = torch.load(request["out"])
    assert Path(output["versions"]["visionzip"]).is_relative_to(official_code), output["versions"]
    return output


def run_ours(checkpoint: str, cases: list[Case], image_files: list[str], dtype: torch.dtype,
             numerics: list[str]) -> tuple[torch.Tensor, dict]:
    """`(image_newline [D], {numerics: [per case, the probe's fields]})`: our model from the same fp16
    weights, in `dtype`, VisionZip in its default (faithful, paper budget) at each case's ratio."""
    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, device="cpu", torch_dtype=torch.float16)
    model = model.to(dtype)
    prompt = first_turn_prompt(compare_released.CONV_MODE, compare_released.USER_TURN)
    input_ids = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
    projector_calls, tower_rows = [], []
    hooks = [model.get_model().mm_projector.register_forward_hook(
                 lambda module, args, output: projector_calls.append((args[0], output))),
             model.get_vision_tower().register_forward_hook(
                 lambda module, args, output: tower_rows.append(output.signals["tower_features"]))]
    outputs = {}
    try:
        for mode in numerics:
            model.set_tower_numerics(mode)
            outputs[mode] = []
            for case, image_file in zip(cases, image_files):
                model.set_compression(method="visionzip", retention_ratio=case.ratio)
                image = Image.open(image_file).convert("RGB")
                pixel_values = process_images([image], image_processor, model.input_config()).to(dtype)
                projector_calls.clear()
                tower_rows.clear()
                with torch.no_grad():
                    embeds = model.prepare_inputs_labels_for_multimodal(
                        input_ids, None, None, None, None, pixel_values, image_sizes=[image.size])[4]
                outputs[mode].append({
                    "input_ids": input_ids[0], "embeds": embeds[0], "tower_rows": tower_rows[0],
                    "projector_inputs": torch.cat([inputs.flatten(0, -2) for inputs, _ in projector_calls]),
                    "projector_outputs": torch.cat([projected.flatten(0, -2) for _, projected in projector_calls])})
    finally:
        for hook in hooks:
            hook.remove()
    return model.get_model().image_newline.detach(), outputs


def compare_case(ours: dict, theirs: dict, our_newline: torch.Tensor, their_newline: torch.Tensor) -> dict:
    """One case's row of the report (see the module docstring)."""
    spans, labels = [], []
    for side, newline in ((ours, our_newline), (theirs, their_newline)):
        spans.append(compare_released.image_span(side["embeds"], side["input_ids"]))
        labels.append(span_labels(spans[-1], side["projector_inputs"], side["projector_outputs"], side["tower_rows"],
                                  newline))
    (our_span, their_span), (our_labels, their_labels) = spans, labels
    same_length = our_span.shape == their_span.shape
    differences = (our_span.float() - their_span.float()).abs().amax(dim=1) if same_length else None
    contextual = their_labels == CONTEXTUAL
    return {
        "same_ids": torch.equal(ours["input_ids"], theirs["input_ids"]),
        "tokens": [our_span.shape[0], their_span.shape[0]],
        "contextual": [int((our_labels == CONTEXTUAL).sum()), int(contextual.sum())],
        "unmatched": [int((our_labels == UNMATCHED).sum()), int((their_labels == UNMATCHED).sum())],
        "same_positions": bool(torch.equal(our_labels, their_labels) and not (our_labels == UNMATCHED).any()),
        "only_kept": compare_released.only_kept(our_labels, their_labels),
        "bit_identical": compare_released.bit_identical(our_span, their_span),
        "bit_identical_unmerged": same_length and compare_released.bit_identical(our_span[~contextual],
                                                                                 their_span[~contextual]),
        "max_abs_diff": differences.max().item() if same_length else None,
        "max_abs_diff_contextual": differences[contextual].max().item() if same_length and contextual.any() else None,
    }


def compare(cases: list[Case], checkpoint: str, official_code: str, upstream_python: str, dtype: str,
            numerics: list[str], work: str) -> list[dict]:
    """Every case on both sides; per case its setting, grid and one `compare_case` row per numerics."""
    image_files = []
    for case in cases:
        image_files.append(os.path.join(work, f"case{case.index:02d}-{case.width}x{case.height}.png"))
        compare_released.case_image(case.width, case.height, seed=case.index).save(image_files[-1])
    official = run_official(upstream_python, official_code, checkpoint, cases, image_files, dtype, work)
    our_newline, ours = run_ours(checkpoint, cases, image_files, getattr(torch, dtype), numerics)
    with open(os.path.join(checkpoint, "config.json")) as handle:
        pinpoints = json.load(handle)["image_grid_pinpoints"]
    rows = []
    for index, case in enumerate(cases):
        grid = get_anyres_image_grid_shape((case.width, case.height), pinpoints, compare_released.CROP_SIZE)
        rows.append({**dataclasses.asdict(case), "grid": list(grid),
                     **{mode: compare_case(ours[mode][index], official["results"][index], our_newline,
                                           official["image_newline"]) for mode in numerics}})
    return rows


def test_span_labels_name_tower_rows_merged_tokens_and_newlines():
    """Two views of [CLS] + 2 patches; the projector doubles. The span: view 1's patch 2, a merged token,
    view 0's [CLS], the newline, a row no projector made."""
    tower_rows = torch.arange(12.0).view(2, 3, 2)
    merged = torch.tensor([0.5, 0.5])
    inputs = torch.stack([tower_rows[0, 0], tower_rows[1, 2], merged])
    outputs = 2 * inputs
    newline = torch.tensor([-1.0, -1.0])
    span = torch.stack([outputs[1], outputs[2], outputs[0], newline, torch.tensor([7.0, 7.0])])
    assert span_labels(span, inputs, outputs, tower_rows, newline).tolist() == [5, CONTEXTUAL, 0, NEWLINE, UNMATCHED]


@pytest.fixture(scope="module")
def official_code(tmp_path_factory) -> str:
    """A folder whose `visionzip/` is the official package, exported from the repository's HEAD."""
    repo = os.environ.get("VISIONZIP_REPO", DEFAULT_REPO)
    archive = subprocess.run(["git", "-C", repo, "archive", "HEAD", "visionzip"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the official VisionZip code is not at {repo} (VISIONZIP_REPO): {archive.stderr[-300:]!r}")
    export = tmp_path_factory.mktemp("visionzip")
    # tar itself: tarfile's safe `filter` is missing from Python releases before 3.11.4
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive.stdout, check=True)
    return str(export)


@pytest.fixture(scope="module")
def upstream_python(official_code, tmp_path_factory) -> str:
    """The upstream interpreter, checked to import stock LLaVA and the official VisionZip with transformers 4.37."""
    python = os.environ.get("LLAVA_UPSTREAM_PYTHON") or compare_released.UPSTREAM_PYTHON
    if not os.path.isfile(python):
        pytest.skip(f"upstream LLaVA's interpreter is not installed ({python}; sh scripts/install.sh upstream)")
    found = subprocess.run([python, "-c", "import llava.model.builder, visionzip, transformers; "
                                          "print(transformers.__version__)"],
                           cwd=tmp_path_factory.mktemp("upstream-check"),
                           env=compare_released.upstream_environment(official_code), capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() != "4.37.2":
        last_error = (found.stderr.strip().splitlines() or [""])[-1]
        pytest.skip(f"{python} cannot run the official VisionZip code: {last_error}")
    return python


CASES = visionzip_cases(6)  # grids 2x1, 1x2, 2x2, 3x1, 1x3 and a letterboxed 2x2; all six settings
NUMERICS = ["sdpa", "released"]
CONTEXTUAL_FP32_TOLERANCE = 1e-5  # the member sums' rounding in fp32, through the projector (measured <= 1.9e-6)


@pytest.fixture(scope="module")
def reports(official_code, upstream_python, tiny_checkpoint, tmp_path_factory) -> dict:
    """`{dtype: compare(...)}` for fp16 and fp32, each once for the whole module."""
    return {dtype: compare(CASES, tiny_checkpoint, official_code, upstream_python, dtype, NUMERICS,
                           str(tmp_path_factory.mktemp(dtype)))
            for dtype in ("float16", "float32")}


def _assert_same_sequence(row: dict, mode: str) -> None:
    """Same prompt ids, and spans of the same length whose rows are all named on both sides."""
    result = row[mode]
    assert result["same_ids"], row
    views = 1 + row["grid"][0] * row["grid"][1]
    assert result["tokens"] == [views * (row["dominant"] + row["contextual"])] * 2, row  # V (dominant + contextual)
    assert result["unmatched"] == [0, 0], row


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_case_sends_the_official_number_of_tokens_whatever_the_numerics(reports, dtype):
    """Our budget R = (dominant + contextual) / 576 gives back the official split in every view."""
    assert [row["grid"] for row in reports[dtype]] == [[2, 1], [1, 2], [2, 2], [3, 1], [1, 3], [2, 2]]
    for row in reports[dtype]:
        for mode in NUMERICS:
            _assert_same_sequence(row, mode)


def test_released_numerics_send_the_official_tokens_bit_for_bit_in_fp16(reports):
    for row in reports["float16"]:
        result = row["released"]
        assert result["same_positions"] and result["only_kept"] == [0, 0], row
        assert result["bit_identical"] and result["max_abs_diff"] == 0.0, row


def test_released_numerics_in_fp32_same_tokens_unmerged_rows_bit_for_bit(reports):
    """The [CLS] and dominant tokens are the official ones bit for bit; the merged tokens agree to rounding."""
    for row in reports["float32"]:
        result = row["released"]
        assert result["same_positions"] and result["bit_identical_unmerged"], row
        assert result["max_abs_diff_contextual"] <= CONTEXTUAL_FP32_TOLERANCE, row


@pytest.mark.xfail(strict=True, reason="in fp32 our member sum (visionzip.py contextual_features, one index_add_) "
                                       "adds in another order than the official one-hot bmm (clip_encoder.py:77); "
                                       "fp16 rounds both sums alike. The spec names no such option (V9 is fp16)")
def test_released_numerics_merged_tokens_bit_for_bit_in_fp32(reports):
    for row in reports["float32"]:
        assert row["released"]["bit_identical"], row
