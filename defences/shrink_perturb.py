"""Shrink-and-perturb (Ash & Adams, 2020) before CleanCLIP fine-tuning, as the study tried:
theta <- shrink * theta + perturb * theta_random, theta_random a fresh initialisation."""
import torch

from defences.base import Defence


class ShrinkPerturb(Defence):
    def __init__(self, shrink: float, perturb: float, mmcl: float, ssl: float):
        super().__init__("mmcl_ssl", mmcl=mmcl, ssl=ssl)
        self.shrink, self.perturb = shrink, perturb

    @torch.no_grad()
    def prepare(self, model, fresh):
        fresh_params = dict(fresh.named_parameters())
        for name, p in model.named_parameters():
            if name != "logit_scale":  # the temperature is not a weight to shrink
                p.mul_(self.shrink).add_(fresh_params[name], alpha=self.perturb)
