"""SSL: in-modal contrastive (CleanCLIP): image vs its augmented view, caption vs its augmented view,
with the shared logit scale: 1/2 [InfoNCE(I, I~) + InfoNCE(T, T~)]. T is the caption's own embedding:
`text_own` when a defence re-paired `text` with other captions (RoCLIP), else `text`."""
from objectives.base import Objective, contrastive, gather_pair


class SSL(Objective):
    name = "ssl"
    views = frozenset({"image_aug", "text_aug"})

    def loss(self, outputs):
        scale = outputs["logit_scale"].exp()
        image, image_aug = gather_pair(outputs["image"], outputs["image_aug"])
        text, text_aug = gather_pair(outputs.get("text_own", outputs["text"]), outputs["text_aug"])
        image_loss = contrastive(image, image_aug, scale)
        text_loss = contrastive(text, text_aug, scale)
        loss = 0.5 * (image_loss + text_loss)
        return loss, {"ssl": loss.detach(), "ssl_image": image_loss.detach(), "ssl_text": text_loss.detach()}
