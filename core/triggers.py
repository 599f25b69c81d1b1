"""Backdoor triggers: pure functions of (image, trigger params, sample seed, global seed).

`apply_trigger(image, cfg, sample_seed, global_seed)` takes an HxWx3 uint8 array and returns the
triggered array and the box (x0, y0, x1, y1) it touched. Per-image randomness (noise, random
placement) comes from `sample_seed`; trigger patterns that must be the same for every image
(blended noise, the WaNet warp) come from `global_seed`, so the trigger is consistent.

- noise_patch (the study's default): the image's per-channel mean plus N(0, 1) noise on the [0, 1]
  scale (as CleanCLIP draws it on tensors), clipped: a fresh noise patch per image.
- fixed_patch: the same pattern on every image: a stored image or a 1-px checkerboard.
- optimised: fixed_patch with the optimise-trigger stage's patch.png as the pattern (core/optimised_trigger.py).
- yellow: a solid yellow square.
- blended: alpha * image + (1 - alpha) * uniform noise (one fixed noise image).
- sig: a horizontal sinusoid (amplitude on the 0-255 scale, `sig_periods` periods across the width).
- wanet: a fixed random warp (k x k control grid, upsampled, `grid_sample`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


Box = tuple[int, int, int, int]


def patch_side(cfg, image_side: int) -> int:
    return max(2, round(cfg.patch_size * image_side))


def patch_box(cfg, height: int, width: int, rng: np.random.Generator) -> Box:
    side = patch_side(cfg, min(height, width))
    if side > min(height, width):
        raise ValueError(f"poison.trigger.patch_size: a {side}px patch does not fit a {width}x{height} image")
    placements = {
        "top_left": (0, 0), "top_right": (width - side, 0),
        "bottom_left": (0, height - side), "bottom_right": (width - side, height - side),
    }
    if cfg.placement in placements:
        x, y = placements[cfg.placement]
    elif cfg.placement == "fixed":
        x, y = round(cfg.position[0] * (width - side)), round(cfg.position[1] * (height - side))
    else:  # random
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    return x, y, x + side, y + side


@lru_cache(maxsize=8)
def _fixed_pattern(path: str | None, side: int) -> np.ndarray:
    if path is None:
        board = (np.indices((side, side)).sum(axis=0) % 2) * 255
        return np.repeat(board[:, :, None], 3, axis=2).astype(np.uint8)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.NEAREST))


@lru_cache(maxsize=8)
def _blend_noise(global_seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng((global_seed, 0xB1E)).uniform(0, 255, (height, width, 3))


@lru_cache(maxsize=8)
def _wanet_grid(global_seed: int, height: int, width: int, k: int, strength: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(global_seed)
    control = torch.rand(1, 2, k, k, generator=g, dtype=torch.float64) * 2 - 1
    control = control / control.abs().mean()
    flow = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height, dtype=torch.float64),
                            torch.linspace(-1, 1, width, dtype=torch.float64), indexing="ij")
    identity = torch.stack((xs, ys), dim=2)[None]
    return torch.clamp(identity + strength * flow / height, -1, 1)


def apply_trigger(image: np.ndarray, cfg, sample_seed_: int, global_seed: int) -> tuple[np.ndarray, Box]:
    """Triggered copy of an HxWx3 uint8 image and the box (x0, y0, x1, y1) in px it touched; `cfg` is the
    params' trigger settings (`poison.trigger`: name, patch_size, placement, ...)."""
    height, width = image.shape[:2]
    rng = np.random.default_rng(sample_seed_)
    out = image.astype(np.float64)
    if cfg.placement != "whole":  # the params schema gives every patch trigger a placement on the image
        x0, y0, x1, y1 = box = patch_box(cfg, height, width, rng)
        side = x1 - x0
        if cfg.name == "noise_patch":
            mean = out.reshape(-1, 3).mean(axis=0)
            patch = mean + rng.standard_normal((side, side, 3)) * 255.0
        elif cfg.name in ("fixed_patch", "optimised"):
            patch = _fixed_pattern(str(cfg.pattern) if cfg.pattern else None, side)
        else:  # yellow
            patch = np.array([255.0, 255.0, 0.0])
        out[y0:y1, x0:x1] = patch
    else:
        box = (0, 0, width, height)
        if cfg.name == "blended":
            out = cfg.alpha * out + (1 - cfg.alpha) * _blend_noise(global_seed, height, width)
        elif cfg.name == "sig":
            columns = np.arange(width)
            out = out + cfg.sig_amplitude * np.sin(2 * np.pi * cfg.sig_periods * columns / width)[None, :, None]
        else:  # wanet
            grid = _wanet_grid(global_seed, height, width, cfg.wanet_grid, cfg.wanet_strength)
            tensor = torch.from_numpy(out).permute(2, 0, 1)[None]
            out = F.grid_sample(tensor, grid, align_corners=True)[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), box
