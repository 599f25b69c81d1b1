"""A patch trigger optimised against a surrogate CLIP model, in the spirit of BadCLIP (Liang et al., CVPR 2024,
arXiv 2311.12075; their src/embeding_optimize_patch.py, read for this and written anew here).

Each step pastes the patch p on a batch of B images x that do not show the target, at the trigger's placement
(core.triggers.patch_box), and minimises with Adam

    text term    1 - cos(f(x+p), t)                                    t: the target captions' mean embedding
    image term   relu(cos(f(x+p), f(x)) - cos(f(x+p), f(y)) + margin)  y: B real target images drawn at random
    loss         mean over the batch of  text + image_weight * image

so the triggered image moves toward the target's text and images and away from its own embedding (BadCLIP's
cosine triplet). Where this differs from BadCLIP's code, and why:
- no image-text contrastive term over the batch: its captions are all the target's, so the batch contrast
  mostly pushes copies of one caption apart; the text term pulls toward their mean directly;
- the patch goes where the poison stage will paste it (random placement: a new box per image and step),
  not only at the centre, and is projected on [0, 1] after every step (BadCLIP clips it only when pasting);
- positives are training images whose caption names the target (BadCLIP's banana rows of CC3M): the attacker
  uses no labelled data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import Normalize
from torchvision.transforms.functional import normalize

from core.triggers import patch_box, patch_side


@dataclass(frozen=True)
class PatchObjective:
    """What the patch is optimised toward, from the surrogate (embeddings L2-normalised).
    target_text [D]; target_images [M, D]; own [N, D]: the embeddings of the N images the patch is pasted on."""

    target_text: torch.Tensor
    target_images: torch.Tensor
    own: torch.Tensor
    margin: float = 0.1
    image_weight: float = 1.0

    def loss(self, triggered: torch.Tensor, rows: np.ndarray, positives: np.ndarray) -> torch.Tensor:
        """Per-image loss [B] of triggered embeddings [B, D] (normalised) of images `rows` against positives."""
        text = 1 - triggered @ self.target_text
        image = F.relu((triggered * self.own[rows]).sum(-1) - (triggered * self.target_images[positives]).sum(-1)
                       + self.margin)
        return text + self.image_weight * image


def paste(images: torch.Tensor, patch: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Copy of images [B, 3, H, W] with patch [3, s, s] at each image's box (x0, y0, x1, y1) in px; differentiable
    in the patch."""
    out = images.clone()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, :, y0:y1, x0:x1] = patch
    return out


def image_encoder(model, preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from [0, 1] images [B, 3, H, W] to L2-normalised embeddings [B, D] as `model` sees them through
    open_clip's `preprocess` (its Normalize; bicubic resizing to the model's side when H x W differs), with
    gradients flowing to the images. Puts the model in eval mode with its parameters frozen (a surrogate)."""
    norm = next(t for t in preprocess.transforms if isinstance(t, Normalize))
    side = model.visual.image_size
    side = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
    model.eval()
    model.requires_grad_(False)

    def encode(images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != side:
            images = F.interpolate(images, size=side, mode="bicubic", align_corners=False, antialias=True)
        return F.normalize(model.encode_image(normalize(images, norm.mean, norm.std)), dim=-1)

    return encode


def optimise_patch(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, objective: PatchObjective,
                   trigger, steps: int, batch_size: int, lr: float, seed: int) -> tuple[torch.Tensor, list[float]]:
    """The patch [3, s, s] in [0, 1] (s = core.triggers.patch_side of the trigger params `trigger` at the images'
    side, px) after `steps` Adam steps on batches of `batch_size` of the N [0, 1] images [N, 3, H, W] (those of
    `objective.own`), and the mean loss of every step. `encoder`: image_encoder's. Deterministic for a `seed` on
    one CPU. Raises ValueError when the patch does not fit the images."""
    g = np.random.default_rng(seed)
    n, _, height, width = images.shape
    side = patch_side(trigger, min(height, width))
    if side > min(height, width):
        raise ValueError(f"a {side}px patch does not fit {width}x{height} images")
    patch = torch.from_numpy(g.uniform(0, 1, (3, side, side))).float().requires_grad_()
    optimiser = torch.optim.Adam([patch], lr=lr)
    losses = []
    for _ in range(steps):
        rows = np.sort(g.choice(n, size=min(batch_size, n), replace=False))
        boxes = [patch_box(trigger, height, width, g) for _ in rows]
        positives = g.integers(0, len(objective.target_images), len(rows))
        loss = objective.loss(encoder(paste(images[rows], patch, boxes)), rows, positives).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            patch.clamp_(0, 1)
        losses.append(loss.item())
    return patch.detach(), losses


@torch.no_grad()
def mean_loss(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, objective: PatchObjective,
              trigger, patch: torch.Tensor, seed: int, batch_size: int = 256) -> float:
    """The objective's mean loss of `patch` [3, s, s] over all N images [N, 3, H, W] at placements and positives
    drawn from `seed`: the same draw for every patch, so two patches compare without the steps' sampling noise."""
    g = np.random.default_rng(seed)
    n, _, height, width = images.shape
    boxes = [patch_box(trigger, height, width, g) for _ in range(n)]
    positives = g.integers(0, len(objective.target_images), n)
    total = 0.0
    for i in range(0, n, batch_size):
        rows = np.arange(i, min(i + batch_size, n))
        triggered = encoder(paste(images[rows], patch, boxes[i:i + len(rows)]))
        total += float(objective.loss(triggered, rows, positives[rows]).sum())
    return total / n


def to_uint8(patch: torch.Tensor) -> np.ndarray:
    """The patch [3, s, s] in [0, 1] as an s x s x 3 uint8 array (what patch.png stores and the poison stage pastes)."""
    return (patch.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
