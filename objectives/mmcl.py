"""MMCL: CLIP's symmetric InfoNCE between images and captions over the global batch."""
from objectives.base import Objective, contrastive, gather_pair


class MMCL(Objective):
    name = "mmcl"

    def loss(self, outputs):
        image, text = gather_pair(outputs["image"], outputs["text"])
        loss = contrastive(image, text, outputs["logit_scale"].exp())
        return loss, {"mmcl": loss.detach()}
