"""``--save-examples``: a picture of what an attack does to a few images (clean, triggered, their difference)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from onnxclp.errors import OnnxclpError


def save_example_grid(
    directory: str | os.PathLike[str], clean: torch.Tensor, triggered: torch.Tensor, name: str, count: int = 8
) -> Path:
    """Write ``<name>_examples.png``: clean images, their triggered versions, and |difference| scaled to full
    range (so that faint triggers such as WaNet's warp are visible), one row each, up to ``count`` columns."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = min(count, clean.shape[0])
    if n == 0:
        raise OnnxclpError("--save-examples: no attacked sample to show")
    a, b = clean[:n].float().cpu(), triggered[:n].float().cpu()
    diff = (b - a).abs()
    diff = diff / diff.amax().clamp_min(1e-8)
    rows = torch.stack([a, b, diff])  # (3, n, C, H, W)
    if rows.shape[2] == 1:
        rows = rows.expand(-1, -1, 3, -1, -1)
    rows = rows[:, :, :3]
    _, _, C, H, W = rows.shape
    scale = max(1, 96 // max(H, W))
    gap = 2
    canvas = torch.ones(C, 3 * (H * scale + gap) + gap, n * (W * scale + gap) + gap)
    for r in range(3):
        for c in range(n):
            tile = rows[r, c].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            y0, x0 = gap + r * (H * scale + gap), gap + c * (W * scale + gap)
            canvas[:, y0 : y0 + H * scale, x0 : x0 + W * scale] = tile
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = directory / f"{name}_examples.png"
    Image.fromarray(pixels).save(path)
    return path
