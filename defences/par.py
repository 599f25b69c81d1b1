"""Perturb-and-Recover (PAR; Singh, Croce and Hein, arXiv 2412.00727) as a cleaning defence.

Fine-tuning on clean pairs with the CLIP loss minus a bounded term that pushes the model's embeddings away
from those of the frozen poisoned model it starts from:

    L = MMCL(u, t) - w * (D_img * [D_img <= tau] + D_txt * [D_txt <= tau])
    D_img = mean_i ||u_i - u0_i||^2,  D_txt = mean_i ||t_i - t0_i||^2

u, t: the fine-tuned model's normalised image and caption embeddings; u0, t0: the frozen model's, on the
same inputs; means over the global batch. For unit vectors D = 2 - 2 cos lies in [0, 4]; once a batch's D
exceeds tau the term is 0 (no gradient): the embeddings are perturbed up to the bound while the CLIP loss
recovers the clean behaviour. The logit scale is not trained (detached), as in the reference code.

Read from the paper and its public code (nmndeep/PerturbAndRecover), implemented here; defaults are the
code's (w = 0.5, tau = 2.15). Difference: the images are the loader's, without the code's noise and erasing.
"""
from __future__ import annotations

import copy

import torch

from core.model import DualEncoder, encode_text
from defences.base import Defence
from objectives.base import Objective, contrastive, gather_pair


def bounded_distance(a: torch.Tensor, b: torch.Tensor, bound: float) -> torch.Tensor:
    """mean_i ||a_i - b_i||^2 of [B, D] rows if it is at most `bound`, else 0 (no gradient)."""
    d = (a - b).square().sum(dim=1).mean()
    return d if d.item() <= bound else d * 0


class PARLoss(Objective):
    def __init__(self, weight: float, bound: float):
        self.weight, self.bound = weight, bound

    def loss(self, outputs):
        image, text = gather_pair(outputs["image"], outputs["text"])
        frozen_image, frozen_text = gather_pair(outputs["frozen_image"], outputs["frozen_text"])
        clip = contrastive(image, text, outputs["logit_scale"].detach().exp())
        d_image = bounded_distance(image, frozen_image, self.bound)
        d_text = bounded_distance(text, frozen_text, self.bound)
        loss = clip - self.weight * (d_image + d_text)
        return loss, {"mmcl": clip.detach(), "par_image": d_image.detach(), "par_text": d_text.detach()}


class WithFrozen(torch.nn.Module):
    """DualEncoder's outputs plus the frozen model's embeddings of the same batch (`frozen_image`, `frozen_text`)."""

    def __init__(self, model: torch.nn.Module, frozen: torch.nn.Module):
        super().__init__()
        self.encoder, self.frozen = DualEncoder(model), frozen

    def forward(self, batch: dict) -> dict:
        out = self.encoder(batch)
        with torch.no_grad():
            out["frozen_image"] = self.frozen.encode_image(batch["image"], normalize=True)
            out["frozen_text"] = encode_text(self.frozen, batch["text"])
        return out


class PerturbAndRecover(Defence):
    def __init__(self, weight: float, bound: float):
        if weight < 0 or not 0 < bound <= 4:
            raise ValueError(f"par: weight must be >= 0 and bound in (0, 4] (squared distances of unit vectors), "
                             f"got weight={weight}, bound={bound}")
        super().__init__("mmcl")
        self.weight, self.bound, self.frozen = weight, bound, None

    def objective(self):
        return PARLoss(self.weight, self.bound)

    def prepare(self, model, fresh):
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def encoder(self, model):
        if self.frozen is None:
            raise RuntimeError("par: prepare(model, ...) keeps the frozen model; call it before encoder()")
        return WithFrozen(model, self.frozen)
