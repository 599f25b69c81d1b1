"""Mann-Whitney (AUC) loss for dual encoders ("Optimizing What Matters: AUC-Driven Learning for
Robust Neural Retrieval", 2025): binary cross-entropy on every positive-minus-negative score difference,

L = 1/2 [ mean_{i, j!=i} softplus(-s (S_ii - S_ij)) + mean_{i, j!=i} softplus(-s (S_ii - S_ji)) ],
S = I T^T, in both directions (image->text rows, text->image columns), over the global batch."""
import torch
import torch.nn.functional as F

from objectives.base import Objective, gather_pair


class MannWhitneyAUC(Objective):
    name = "mw_auc"

    def loss(self, outputs):
        image, text = gather_pair(outputs["image"], outputs["text"])
        batch = image.shape[0]
        scores = outputs["logit_scale"].exp() * image @ text.T
        if batch < 2:  # no negatives: nothing to rank
            loss = scores.sum() * 0
            return loss, {"mw_auc": loss.detach()}
        positives = scores.diagonal()
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=scores.device)
        image_to_text = F.softplus(-(positives[:, None] - scores))[off_diagonal].mean()
        text_to_image = F.softplus(-(positives[None, :] - scores))[off_diagonal].mean()
        loss = 0.5 * (image_to_text + text_to_image)
        return loss, {"mw_auc": loss.detach(), "mw_auc_i2t": image_to_text.detach(), "mw_auc_t2i": text_to_image.detach()}
