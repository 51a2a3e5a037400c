"""Projector from CLIP features to the language model's embedding space (`mm_projector_type`)."""

from __future__ import annotations

import re

from torch import nn


class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_vision_projector(config) -> nn.Module:
    """`linear`, `mlpNx_gelu` (N Linear layers with GELU between) or `identity`.

    Module indices match upstream's `nn.Sequential`, so checkpoint keys are `mm_projector.0.*`,
    `mm_projector.2.*`, ...
    """
    projector_type = getattr(config, "mm_projector_type", "linear")
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    if projector_type == "identity":
        return IdentityMap()
    mlp = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if mlp is None:
        raise ValueError(f"unknown mm_projector_type: {projector_type!r} (expected linear, mlpNx_gelu or identity)")
    modules: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(int(mlp.group(1)) - 1):
        modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
    return nn.Sequential(*modules)
