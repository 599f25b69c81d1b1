"""CyCLIP (Goel et al., 2022): MMCL plus cyclic consistency of similarities.

cross-modal: mean_ij (I_i.T_j - I_j.T_i)^2 * B   (the similarity matrix should be symmetric)
in-modal:    mean_ij (I_i.I_j - T_i.T_j)^2 * B   (image-image and text-text geometry should agree)
as in the reference code (logits divided by s^2, times the batch size); weights 0.25 by default."""
from objectives.base import Objective, contrastive, gather_pair


class CyCLIP(Objective):
    name = "cyclip"

    def __init__(self, cross: float, inmodal: float):
        self.cross, self.inmodal = cross, inmodal

    def loss(self, outputs):
        image, text = gather_pair(outputs["image"], outputs["text"])
        batch = image.shape[0]
        clip = contrastive(image, text, outputs["logit_scale"].exp())
        sim = image @ text.T
        cross = (sim - sim.T).square().mean() * batch
        inmodal = (image @ image.T - text @ text.T).square().mean() * batch
        loss = clip + self.cross * cross + self.inmodal * inmodal
        return loss, {"mmcl": clip.detach(), "cyclic_cross": cross.detach(), "cyclic_inmodal": inmodal.detach()}
