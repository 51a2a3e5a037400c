"""The released GlobalCom2 code's behaviour for one image, restated literally (loops and all).

This is an oracle, not part of the model: tests check `globalcom2.compress_image_features`
against it element for element, and `tools/benchmark_compression.py` times it as the baseline.
It follows `shared/spec/globalcom2-official-behaviour.md` step by step, including what makes
the released code slow (per-patch `.item()` calls, a per-token placement loop, a full fp32
canvas) and its final cast to fp16, so its timings are representative. It raises where the
released code raises (empty image areas, Q8). It does not reproduce the batch bug Q1: it is
given one image's own scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def released_scales(thumbnail_scores, grid_w, grid_h, ratio, temperature=10.0):
    side = int(thumbnail_scores.shape[0] ** 0.5)
    block_w, block_h = max(side // grid_w, 1), max(side // grid_h, 1)
    sums = np.zeros(grid_w * grid_h)
    for index, score in enumerate(thumbnail_scores):
        row, col = divmod(index, side)
        crop = min(row // block_h, grid_h - 1) * grid_w + min(col // block_w, grid_w - 1)
        sums[crop] += score.item()
    exp_scores = np.exp((sums - np.max(sums)) / temperature)
    softmax = exp_scores / (np.sum(exp_scores) + 1e-8)
    return np.clip(ratio * (1 + softmax - np.mean(softmax)), None, 1.0).tolist()


def released_compress_image(image_feature, cls_attn_scores, image_size, grid, image_newline, ratio,
                            cast_to_fp16=True):
    """`image_feature` `[1 + C, P, D]`, `cls_attn_scores` `[1 + C, P]` -> the released sequence.

    `cast_to_fp16=False` skips the released code's hard-coded cast of the crop part (Q6), for
    comparisons in fp32 or bf16.
    """
    grid_w, grid_h = grid
    num_patches = image_feature.shape[1]
    side = int(num_patches ** 0.5)

    # Thumbnail: best scores first.
    thumbnail_scores = cls_attn_scores[0]
    order = torch.argsort(thumbnail_scores, descending=True)
    thumbnail_tokens = image_feature[0][order[:int(num_patches * ratio)]]
    scales = released_scales(thumbnail_scores, grid_w, grid_h, ratio)

    # Image area of the crop canvas, as a mask.
    crops, crop_scores = image_feature[1:], cls_attn_scores[1:]
    num_crops, _, dim = crops.shape
    height, width = grid_h * side, grid_w * side
    mask = torch.zeros(height, width, dtype=torch.bool)
    original_width, original_height = image_size
    if original_width / original_height > width / height:
        padding = (height - int(original_height * (width / original_width))) // 2
        mask[padding:height - padding, :] = True
    else:
        padding = (width - int(original_width * (height / original_height))) // 2
        mask[:, padding:width - padding] = True
    rows, cols = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    cur_height, cur_width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)  # IndexError if empty, like Q8
    crop_masks = mask.view(grid_h, side, grid_w, side).permute(0, 2, 1, 3).reshape(num_crops, side, side)
    dimensions = []
    for crop_mask in crop_masks:
        ys, xs = torch.nonzero(crop_mask, as_tuple=True)
        dimensions.append((0, 0) if len(ys) == 0 else (int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)))
    crop_masks = crop_masks.reshape(num_crops, num_patches)

    # Global scores: thumbnail resized to the image area, split with the (i, 0) row-offset rule.
    resized = F.interpolate(thumbnail_scores.view(1, 1, side, side), size=(cur_height, cur_width),
                            mode="bilinear", align_corners=False).squeeze()
    global_scores, row_offset = [], 0
    for i in range(grid_h):
        col_offset = 0
        for j in range(grid_w):
            crop_width, crop_height = dimensions[i * grid_w + j]
            global_scores.append(resized[row_offset:row_offset + crop_height, col_offset:col_offset + crop_width].flatten())
            col_offset += crop_width
        row_offset += dimensions[i * grid_w][1]

    # Per crop: top-k of the packed (image-only) combined scores; packed indices are kept.
    canvas = torch.zeros(num_crops, num_patches, dim)
    placed = torch.zeros(num_crops, num_patches, dtype=torch.bool)
    for crop in range(num_crops):
        tokens = crops[crop][crop_masks[crop]]
        local = crop_scores[crop][crop_masks[crop]]
        combined = (F.normalize(local.unsqueeze(0), p=2, dim=-1).squeeze(0)
                    + F.normalize(global_scores[crop].unsqueeze(0), p=2, dim=-1).squeeze(0))
        _, packed = torch.topk(combined, int(tokens.shape[0] * scales[crop]))
        for token, index in zip(tokens[packed], packed):
            canvas[crop, index] = token  # the packed index used as a crop cell (Q2)
            placed[crop, index] = True

    # Canvas rows, each followed by the newline; keep the placed cells and every newline.
    canvas = canvas.view(grid_h, grid_w, side, side, dim).permute(4, 0, 2, 1, 3).reshape(dim, height, width)
    placed = placed.view(grid_h, grid_w, side, side).permute(0, 2, 1, 3).reshape(height, width)
    canvas = torch.cat([canvas, image_newline[:, None, None].expand(dim, height, 1)], dim=-1)
    placed = torch.cat([placed, torch.ones(height, 1, dtype=torch.bool)], dim=-1)
    crop_sequence = canvas.flatten(1, 2).transpose(0, 1)[placed.flatten()]
    crop_sequence = crop_sequence.to(torch.float16 if cast_to_fp16 else image_feature.dtype)
    return torch.cat([thumbnail_tokens, crop_sequence])
