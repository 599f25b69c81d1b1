"""SigLIP: pairwise sigmoid loss with a learnable bias (init scale log 10, bias -10, as open_clip).

L = -1/B sum_ij log sigmoid(z_ij (s I_i.T_j + b)), z = +1 on the diagonal and -1 elsewhere,
over the gathered global batch (B global)."""
import torch
import torch.nn.functional as F

from objectives.base import Objective, gather_pair

INIT_LOGIT_SCALE = 2.302585092994046  # log 10
INIT_LOGIT_BIAS = -10.0


class SigLIP(Objective):
    name = "siglip"
    init_logit_scale = INIT_LOGIT_SCALE
    init_logit_bias = INIT_LOGIT_BIAS

    def loss(self, outputs):
        if outputs.get("logit_bias") is None:
            raise KeyError("objective 'siglip' needs outputs['logit_bias'] (create the model with init_logit_bias)")
        image, text = gather_pair(outputs["image"], outputs["text"])
        logits = outputs["logit_scale"].exp() * image @ text.T + outputs["logit_bias"]
        signs = 2 * torch.eye(image.shape[0], device=image.device, dtype=logits.dtype) - 1
        loss = -F.logsigmoid(signs * logits).sum() / image.shape[0]
        return loss, {"siglip": loss.detach()}
