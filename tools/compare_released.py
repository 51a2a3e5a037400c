"""Our GlobalCom2 against the released code (`xuyang-liu16/GlobalCom2`), both run for real on the tiny
checkpoint: are the kept visual tokens the same, bit for bit?

Each case is one drawn image (sizes covering the v1.6 grids 2x1, 1x2, 2x2, 3x1, 1x3, and odd sizes with
letterbox and pillarbox padding) at one retention ratio, asked one prompt. The released side is the
released repository's own code, unchanged but for its ratio constant (line 101 of `llava_arch.py`, set in
a copy as its README says), run by the upstream LLaVA interpreter (transformers 4.37.2) through
`tools/released_probe.py`. Our side is this repository's model with GlobalCom2 in the `official` layout,
once per tower numerics (`sdpa`, `released`). Both load the same fp16 weights, in `--dtype`, on the CPU,
and both capture what `prepare_inputs_labels_for_multimodal` returns. Per case and numerics:

- `same_positions`: the image span holds the same tokens in the same order. Each span row is named by
  the projected view row (or the newline) it equals, on its own side, so this does not depend on the
  two towers rounding alike; `only_kept`: how many view tokens only we keep, and only the released code;
- `bit_identical`: the image spans are equal bit for bit;
- `max_abs_diff`: the largest absolute difference between the spans (None when their lengths differ);
- `logits_max_abs_diff`: between the language models' logits at the last position.

In a dtype other than fp16 the released code casts its crop tokens to fp16 (behaviour spec Q6) and we
keep the model's dtype, so there the spans are compared after the same cast of our crop rows.

    python tools/compare_released.py                          # 30 cases, fp16
    python tools/compare_released.py --dtype float32 --cases 30 --json compare-fp32.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.conversation import first_turn_prompt  # noqa: E402
from llava.mm_utils import get_anyres_image_grid_shape, process_images, tokenizer_image_token  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402
from llava.model.multimodal_encoder.clip_encoder import TOWER_NUMERICS  # noqa: E402
from llava.tiny import DEFAULT_OUT, ensure_tiny_checkpoint  # noqa: E402
from llava.utils import quiet_transformers  # noqa: E402

PROBE = os.path.join(REPO, "tools", "released_probe.py")
RELEASED_MIRROR = "/work/.mirror/xuyang-liu16+GlobalCom2/repo"
UPSTREAM_PYTHON = os.path.join(REPO, ".venv-upstream", "bin", "python")
# (width, height): the five v1.6 grids exactly, then odd sizes padded by rows (landscape) or columns.
IMAGE_SIZES = [(672, 336), (336, 672), (672, 672), (1008, 336), (336, 1008),
               (800, 500), (500, 900), (1000, 700), (333, 777), (1280, 300)]
RATIOS = (0.5, 0.25, 0.1)
CROP_SIZE = 336  # the tower's image size, for naming each case's grid
CONV_MODE = "llava_v1"
USER_TURN = "<image>\nWhat is shown in this image?"
NEWLINE, UNMATCHED = -1, -2  # kept-position codes of a span row that is the newline / no view row


@dataclasses.dataclass(frozen=True)
class Case:
    index: int
    width: int
    height: int
    ratio: float

    @property
    def image_name(self) -> str:
        return f"case{self.index:02d}-{self.width}x{self.height}.png"


def comparison_cases(count: int) -> list[Case]:
    """The first `count` of the `len(IMAGE_SIZES) * len(RATIOS)` (size, ratio) pairs, ordered so that any
    prefix cycles through the sizes and the ratios: case i has size i mod 10 and ratio (i + i // 10) mod 3,
    which gives each size every ratio once over 30 cases."""
    total = len(IMAGE_SIZES) * len(RATIOS)
    if not 1 <= count <= total:
        raise ValueError(f"--cases must be in 1..{total}, got {count}")
    return [Case(index, *IMAGE_SIZES[index % len(IMAGE_SIZES)],
                 RATIOS[(index + index // len(IMAGE_SIZES)) % len(RATIOS)]) for index in range(count)]


def case_image(width: int, height: int, seed: int) -> Image.Image:
    """A seeded RGB image: smooth colour blobs (a coarse random grid upsampled) plus fine noise, so that
    the tower's scores have structure and ties are rare but possible."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 48 + 2, width // 48 + 2, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    pixels = (0.8 * smooth + 0.2 * torch.rand(3, height, width, generator=generator)) * 255
    return Image.fromarray(pixels.round().to(torch.uint8).permute(1, 2, 0).numpy())


def with_retention_ratio(source: str, ratio: float) -> str:
    """The released `llava_arch.py` source with its module constant `retention_ratio = ...` (line 101,
    the one place its README says to set the ratio) set to `ratio`."""
    pattern = re.compile(r"^retention_ratio = .*$", re.MULTILINE)
    found = pattern.findall(source)
    if len(found) != 1:
        raise ValueError(f"expected one 'retention_ratio = ...' line in the released llava_arch.py, found {found}")
    return pattern.sub(f"retention_ratio = {ratio!r}  # set by tools/compare_released.py", source)


def export_released_repo(mirror: str, work: str) -> str:
    """`llava/` of the mirror's HEAD (`git archive`) under `work`; returns `work`."""
    archive = subprocess.run(["git", "-C", mirror, "archive", "--format=tar", "HEAD", "llava"], check=True,
                             capture_output=True).stdout
    os.makedirs(work, exist_ok=True)
    # tar itself: tarfile's safe `filter` is missing from Python releases before 3.11.4
    subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
    return work


def mirror_commit(mirror: str) -> str:
    """The commit the mirror's HEAD names."""
    return subprocess.run(["git", "-C", mirror, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def released_copy_at_ratio(released_repo: str, ratio: float, work: str) -> str:
    """A copy of `released_repo`'s `llava/` under `work` with its ratio constant set; returns its root."""
    root = os.path.join(work, f"released-r{ratio}")
    shutil.copytree(os.path.join(released_repo, "llava"), os.path.join(root, "llava"))
    arch = os.path.join(root, "llava", "model", "llava_arch.py")
    with open(arch) as handle:
        source = handle.read()
    with open(arch, "w") as handle:
        handle.write(with_retention_ratio(source, ratio))
    return root


def upstream_environment(pythonpath: str) -> dict:
    """Our environment with nothing of ours on the upstream interpreter's path: only the released copy."""
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    return {**environment, "PYTHONPATH": pythonpath}


def run_released(upstream_python: str, released_repo: str, checkpoint: str, image_files: list[str], ratio: float,
                 dtype: str, work: str) -> dict:
    """The probe's output (`tools/released_probe.py`) for `image_files`, all at `ratio`."""
    root = released_copy_at_ratio(released_repo, ratio, work)
    request = {"retention_ratio": ratio, "dtype": dtype, "conv_mode": CONV_MODE, "user_turn": USER_TURN,
               "images": image_files, "out": os.path.join(work, f"released-r{ratio}.pt")}
    request_file = os.path.join(work, f"request-r{ratio}.json")
    with open(request_file, "w") as handle:
        json.dump(request, handle)
    run = subprocess.run([upstream_python, PROBE, request_file], cwd=checkpoint, env=upstream_environment(root),
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the released probe failed (ratio {ratio}):\n{run.stderr[-4000:]}")
    output = torch.load(request["out"])
    if os.path.commonpath([os.path.abspath(output["versions"]["llava"]), root]) != root:
        raise RuntimeError(f"the probe imported {output['versions']['llava']}, not the released copy in {root}")
    return output


def run_ours(checkpoint: str, cases: list[Case], image_files: list[str], dtype: torch.dtype,
             numerics: list[str]) -> tuple[torch.Tensor, dict]:
    """`(image_newline [D], {numerics: [per case {input_ids, embeds, features, last_logits}]})`: our model
    from the same fp16 weights the released loader reads, in `dtype`, GlobalCom2 in the official layout."""
    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, device="cpu", torch_dtype=torch.float16)
    model = model.to(dtype)
    input_ids = torch.tensor([tokenizer_image_token(first_turn_prompt(CONV_MODE, USER_TURN), tokenizer)])
    projected = []
    hook = model.get_model().mm_projector.register_forward_hook(lambda module, args, output: projected.append(output))
    outputs = {}
    try:
        for mode in numerics:
            model.set_tower_numerics(mode)
            outputs[mode] = []
            for case, image_file in zip(cases, image_files):
                model.set_compression(retention_ratio=case.ratio, token_layout="official", method="globalcom2")
                image = Image.open(image_file).convert("RGB")
                pixel_values = process_images([image], image_processor, model.config).to(dtype)
                projected.clear()
                with torch.no_grad():
                    _, position_ids, attention_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                        input_ids, None, None, None, None, pixel_values, image_sizes=[image.size])
                    logits = model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   position_ids=position_ids).logits
                outputs[mode].append({"input_ids": input_ids[0], "embeds": embeds[0], "features": projected[0],
                                      "last_logits": logits[0, -1]})
    finally:
        hook.remove()
    return model.get_model().image_newline.detach(), outputs


def image_span(embeds: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The rows of `embeds` `[L', D]` that replaced the one `IMAGE_TOKEN_INDEX` of `input_ids` `[L]`."""
    (position,) = (input_ids == IMAGE_TOKEN_INDEX).nonzero()[:, 0].tolist()
    text_after = input_ids.shape[0] - position - 1
    return embeds[position:embeds.shape[0] - text_after]


def kept_positions(span: torch.Tensor, features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """Which token each row of an image span is: `[M]` int64, `v * P + p` for view v's patch p, `NEWLINE`
    for the newline, `UNMATCHED` for a row equal to none of them.

    span `[M, D]`; features `[V, P, D]`, the projected views the span was made from; newline `[D]`.
    A row matches a candidate bit for bit, either as it is or rounded through fp16 (the released code's
    cast of the crop tokens, Q6); among equal candidates the first counts, as on both sides alike.
    Vectorised: rows are made ids by `torch.unique` over candidates and span together."""
    candidates = torch.cat([features.flatten(0, 1), newline[None]]).to(span.dtype)
    candidates = torch.cat([candidates, candidates.to(torch.float16).to(span.dtype)])
    _, ids = torch.unique(torch.cat([candidates, span]), dim=0, return_inverse=True)
    candidate_ids, span_ids = ids[:candidates.shape[0]], ids[candidates.shape[0]:]
    first = torch.full((int(ids.max()) + 1,), candidates.shape[0], dtype=torch.int64)
    first = first.scatter_reduce(0, candidate_ids, torch.arange(candidates.shape[0]), "amin")
    found = first[span_ids]
    num_tokens = features.shape[0] * features.shape[1]
    positions = found % (num_tokens + 1)  # a rounded candidate names the same token
    positions = torch.where(positions == num_tokens, NEWLINE, positions)
    return torch.where(found == candidates.shape[0], UNMATCHED, positions)


def only_kept(our_positions: torch.Tensor, their_positions: torch.Tensor) -> list[int]:
    """`[kept by us only, kept by the released code only]`: view tokens (newlines aside) in one of two
    kept-position vectors (`kept_positions`) and not in the other, whatever their order."""
    ours, theirs = our_positions[our_positions >= 0], their_positions[their_positions >= 0]
    return [int((~torch.isin(ours, theirs)).sum()), int((~torch.isin(theirs, ours)).sum())]


def as_released_casts(span: torch.Tensor, thumbnail_tokens: int) -> torch.Tensor:
    """Our span with the released code's fp16 cast of everything after the thumbnail tokens (Q6); the
    identity in fp16."""
    crops = span[thumbnail_tokens:].to(torch.float16).to(span.dtype)
    return torch.cat([span[:thumbnail_tokens], crops])


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (unlike `torch.equal`, tells -0.0 from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(integer), b.contiguous().view(integer))


def compare_case(case: Case, ours: dict, theirs: dict, our_newline: torch.Tensor,
                 their_newline: torch.Tensor) -> dict:
    """One case's row of the report (see the module docstring)."""
    our_span, their_span = image_span(ours["embeds"], ours["input_ids"]), image_span(theirs["embeds"],
                                                                                   theirs["input_ids"])
    our_positions = kept_positions(our_span, ours["features"], our_newline)
    their_positions = kept_positions(their_span, theirs["features"], their_newline)
    our_span = as_released_casts(our_span, int(ours["features"].shape[1] * case.ratio))
    same_length = our_span.shape == their_span.shape
    return {
        "same_ids": torch.equal(ours["input_ids"], theirs["input_ids"]),
        "tokens": [our_span.shape[0], their_span.shape[0]],
        "unmatched": [int((our_positions == UNMATCHED).sum()), int((their_positions == UNMATCHED).sum())],
        "same_positions": bool(torch.equal(our_positions, their_positions)
                               and not (our_positions == UNMATCHED).any()),
        "only_kept": only_kept(our_positions, their_positions),
        "bit_identical": bit_identical(our_span, their_span),
        "max_abs_diff": (our_span.float() - their_span.float()).abs().max().item() if same_length else None,
        "logits_max_abs_diff": (ours["last_logits"].float() - theirs["last_logits"].float()).abs().max().item(),
    }


def summarise(rows: list[dict]) -> dict:
    """Counts and largest differences over the cases of one numerics mode."""
    diffs = [row["max_abs_diff"] for row in rows if row["max_abs_diff"] is not None]
    return {
        "cases": len(rows),
        "bit_identical": sum(row["bit_identical"] for row in rows),
        "same_positions": sum(row["same_positions"] for row in rows),
        "same_kept_sets": sum(row["only_kept"] == [0, 0] for row in rows),
        "same_length": sum(row["tokens"][0] == row["tokens"][1] for row in rows),
        "max_abs_diff": max(diffs) if diffs else None,
        "logits_max_abs_diff": max(row["logits_max_abs_diff"] for row in rows),
    }


def compare(cases: list[Case], checkpoint: str, released_repo: str, upstream_python: str, dtype: str,
            numerics: list[str], work: str) -> dict:
    """Run every case on both sides; returns `{"cases": [...], "totals": {numerics: summary}}`."""
    image_files = []
    for case in cases:
        image_files.append(os.path.join(work, case.image_name))
        case_image(case.width, case.height, seed=case.index).save(image_files[-1])
    theirs, their_newline = [None] * len(cases), {}
    for ratio in sorted({case.ratio for case in cases}):
        chosen = [i for i, case in enumerate(cases) if case.ratio == ratio]
        output = run_released(upstream_python, released_repo, checkpoint, [image_files[i] for i in chosen], ratio,
                              dtype, work)
        their_newline = output["image_newline"]
        for i, result in zip(chosen, output["results"]):
            theirs[i] = result
    our_newline, ours = run_ours(checkpoint, cases, image_files, getattr(torch, dtype), numerics)
    with open(os.path.join(checkpoint, "config.json")) as handle:
        pinpoints = json.load(handle)["image_grid_pinpoints"]
    rows = []
    for i, case in enumerate(cases):
        row = {**dataclasses.asdict(case),
               "grid": list(get_anyres_image_grid_shape((case.width, case.height), pinpoints, CROP_SIZE))}
        for mode in numerics:
            row[mode] = compare_case(case, ours[mode][i], theirs[i], our_newline, their_newline)
        rows.append(row)
    return {"cases": rows, "totals": {mode: summarise([row[mode] for row in rows]) for mode in numerics}}


def format_cell(result: dict) -> str:
    """One numerics mode's columns of a case: tokens ours/released, same positions, bit-identical, view
    tokens only we keep / only the released code keeps, max |diff|."""
    yes_no = {True: "yes", False: "no"}
    diff = "-" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.3g}"
    return (f"{'/'.join(map(str, result['tokens'])):>9} {yes_no[result['same_positions']]:>3} "
            f"{yes_no[result['bit_identical']]:>4} {'/'.join(map(str, result['only_kept'])):>7} {diff:>9}")


def format_report(report: dict) -> str:
    """A line per case (`format_cell` per numerics mode) and the totals."""
    numerics = list(report["totals"])
    header = f"{'tokens':>9} {'pos':>3} {'bits':>4} {'only':>7} {'max|diff|':>9}"
    lines = [" " * 25 + " | ".join(f"{mode:^{len(header)}}" for mode in numerics),
             f"{'case':>4} {'size':>9} {'grid':>4} {'R':>4} " + " | ".join(header for _ in numerics)]
    for row in report["cases"]:
        lines.append(f"{row['index']:>4} {row['width']:>4}x{row['height']:<4} {row['grid'][0]}x{row['grid'][1]} "
                     f"{row['ratio']:>4} " + " | ".join(format_cell(row[mode]) for mode in numerics))
    for mode, total in report["totals"].items():
        cases = total["cases"]
        lines.append(f"{mode}: bit-identical {total['bit_identical']}/{cases}, same positions "
                     f"{total['same_positions']}/{cases}, same kept sets {total['same_kept_sets']}/{cases}, same "
                     f"length {total['same_length']}/{cases}, max |diff| {total['max_abs_diff']}, last-position "
                     f"logits max |diff| {total['logits_max_abs_diff']:.3g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--released-repo", default=os.environ.get("LLAVA_RELEASED_REPO"),
                        help="a directory holding the released `llava/` (default: $LLAVA_RELEASED_REPO, else "
                             f"exported from {RELEASED_MIRROR})")
    parser.add_argument("--upstream-python", default=UPSTREAM_PYTHON,
                        help="the interpreter with transformers 4.37.2 (default: .venv-upstream/bin/python)")
    parser.add_argument("--checkpoint", help=f"an AnyRes CLIP checkpoint (default: the tiny one, {DEFAULT_OUT}, "
                                             "built if missing)")
    parser.add_argument("--cases", type=int, default=len(IMAGE_SIZES) * len(RATIOS))
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--numerics", nargs="+", choices=TOWER_NUMERICS, default=list(TOWER_NUMERICS),
                        help="our tower numerics to compare (default: all)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.upstream_python):
        parser.error(f"no upstream interpreter at {args.upstream_python}: run `sh scripts/install.sh upstream`")
    quiet_transformers()
    cases = comparison_cases(args.cases)
    checkpoint = os.path.abspath(args.checkpoint or ensure_tiny_checkpoint(os.path.join(REPO, DEFAULT_OUT)))
    with tempfile.TemporaryDirectory(prefix="compare-released-") as work:
        released_repo = args.released_repo
        if released_repo is None:
            if not os.path.isdir(RELEASED_MIRROR):
                parser.error("give --released-repo (a clone of https://github.com/xuyang-liu16/GlobalCom2, commit "
                             "96b2d00) or set $LLAVA_RELEASED_REPO")
            released_repo = export_released_repo(RELEASED_MIRROR, os.path.join(work, "released"))
        report = compare(cases, checkpoint, os.path.abspath(released_repo), args.upstream_python, args.dtype,
                         args.numerics, work)
    report["setup"] = {"dtype": args.dtype, "checkpoint": checkpoint, "released_repo": args.released_repo
                       or f"{RELEASED_MIRROR} @ {mirror_commit(RELEASED_MIRROR)}", "machine": platform.platform(),
                       "processor": platform.processor(), "torch": torch.__version__}
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main()
