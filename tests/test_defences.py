"""The defences' and detectors' mechanisms on hand-made data: SafeCLIP's split and loss, RoCLIP's matching and
pool, PAR's bounded term, the detectors' rankings and the detection metrics."""
import numpy as np
import pytest
import torch

from core.stats import detection_metrics
from defences.par import PARLoss, bounded_distance
from defences.registry import get_defence, get_pretraining_defence
from defences.roclip import nearest
from defences.safeclip import safe_posterior, split
from detectors.registry import get_detector
from objectives.base import contrastive
from objectives.registry import get_objective
from objectives.ssl import SSL


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def outputs(n: int = 12, d: int = 8, seed: int = 0, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: unit(torch.randn(n, d, generator=g)).requires_grad_(grad) for k in ("image", "text", "image_aug", "text_aug")}
    return out | {"logit_scale": torch.tensor(np.log(10.0)), "logit_bias": None}


# SafeCLIP


def test_safeclip_split_puts_a_planted_low_similarity_group_in_the_risky_part():
    rng = np.random.default_rng(0)
    keys = [f"k{i:04d}" for i in range(1000)]
    similarity = np.concatenate([rng.normal(0.6, 0.05, 900), rng.normal(0.1, 0.05, 100)])  # the last 100: planted
    planted = set(keys[900:])
    risky, share = split(keys, similarity, None, 0.9, seed=0)
    assert planted <= risky and len(risky - planted) < 30  # the first split: p_safe >= 0.9
    assert share == pytest.approx(1 - len(risky) / 1000)
    # a later split takes the top share by p_safe: a bigger share moves the borderline pairs, not the planted ones
    risky2, share2 = split(keys, similarity, 0.85, 0.9, seed=0)
    assert share2 == pytest.approx(0.85) and planted <= risky2 and len(risky2) == 150
    # the order of the keys does not change the split
    order = rng.permutation(1000)
    assert split([keys[i] for i in order], similarity[order], 0.85, 0.9, seed=0)[0] == risky2
    p = safe_posterior(similarity, seed=0)
    assert p[:900].mean() > 0.95 and p[900:].max() < 0.05


def test_safeclip_trains_the_objective_on_safe_pairs_and_ssl_on_risky_ones():
    defence = get_pretraining_defence("safeclip", warmup=1, crossmodal=0)
    objective = get_objective("mmcl")
    keys = [f"k{i}" for i in range(12)]
    out = outputs()
    # the warm-up: every pair unimodal
    assert defence.begin_epoch(0, similarities=lambda: pytest.fail("no split in the warm-up"), seed=0) == {"safeclip": "warm-up"}
    defence.begin_step(keys)
    wrapped = defence.wrap(objective)
    assert wrapped(out)[0] == pytest.approx(SSL()(out)[0].item())
    # after it: a split from the model's similarities; the risky pairs' captions never meet their images
    pairs = {"keys": keys, "similarity": np.array([0.9] * 9 + [-0.9] * 3)}
    defence.begin_epoch(1, similarities=lambda: pairs, seed=0)
    assert defence.risky == {"k9", "k10", "k11"}
    defence.begin_step(keys)
    loss, parts = wrapped(out)
    safe = {k: v[:9] if torch.is_tensor(v) and v.ndim == 2 else v for k, v in out.items()}
    risky = {k: v[9:] if torch.is_tensor(v) and v.ndim == 2 else v for k, v in out.items()}
    assert loss.item() == pytest.approx(objective(safe)[0].item() + SSL()(risky)[0].item(), rel=1e-6)
    assert parts["safeclip_risky"] == 3
    # its state travels in the checkpoint: a resumed run keeps the epoch's split without embedding again
    again = get_pretraining_defence("safeclip", warmup=1, crossmodal=0)
    again.load_state_dict(defence.state_dict())
    again.begin_epoch(1, similarities=lambda: pytest.fail("the split of epoch 1 is restored"), seed=0)
    assert again.risky == defence.risky and again.share == defence.share
    # with a logit bias (SigLIP) that neither part uses, every parameter keeps a (zero) gradient: DDP waits for each
    bias = torch.zeros((), requires_grad=True)
    defence.begin_epoch(0, similarities=None, seed=0)
    defence.begin_step(keys)
    wrapped(out | {"logit_bias": bias})[0].backward()
    assert bias.grad is not None and bias.grad == 0
    assert defence.idle(1) and not defence.idle(2)  # 1 + 0 warm-up epochs: the split comes in the second


# RoCLIP


def test_roclip_matches_each_image_with_the_nearest_pool_caption():
    pool = unit(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)))
    image = unit(pool[[3, 17, 42]] + 0.05 * torch.randn(3, 8, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(nearest(image, pool), pool[[3, 17, 42]])
    brute = torch.stack([pool[max(range(50), key=lambda j: float(i @ pool[j]))] for i in image])
    assert torch.equal(nearest(image, pool), brute)


def test_roclip_pool_is_a_fifo_and_matching_happens_every_kth_epoch():
    defence = get_pretraining_defence("roclip", pool=20, every=2)
    objective = get_objective("mmcl")
    wrapped = defence.wrap(objective)
    assert defence.begin_epoch(0, similarities=None, seed=0) == {"roclip_matching": False}
    seen = []
    for step in range(3):
        out = outputs(seed=step)
        assert wrapped(out)[0] == pytest.approx(objective(out)[0].item())  # not a matching epoch: as it is
        defence.end_step()
        seen.append(out["text"])
    assert torch.equal(defence.pool, torch.cat(seen)[-20:])  # the latest 20 captions
    assert defence.begin_epoch(1, similarities=None, seed=0) == {"roclip_matching": True}
    out = outputs(seed=7, grad=True)
    loss, parts = wrapped(out)
    matched = nearest(out["image"].detach(), defence.pool)
    assert loss.item() == pytest.approx(contrastive(out["image"], matched, out["logit_scale"].exp()).item(), rel=1e-6)
    loss.backward()
    assert out["text"].grad is not None and not out["text"].grad.any()  # in the graph, without gradient
    restored = get_pretraining_defence("roclip", pool=20, every=2)
    restored.load_state_dict(defence.state_dict())
    assert torch.equal(restored.pool, defence.pool)
    # MMCL+SSL: the cross-modal term sees the matched captions, SSL's in-modal term the captions' own
    out = outputs(seed=8)
    both = defence.wrap(get_objective("mmcl_ssl"))(out)[0]
    matched = nearest(out["image"], defence.pool)
    expected = contrastive(out["image"], matched, out["logit_scale"].exp()) + SSL()(out)[0]
    assert both.item() == pytest.approx(expected.item(), rel=1e-6)
    assert defence.idle(1) and not defence.idle(2)


# PAR


def test_par_term_is_bounded_and_pushes_away_from_the_frozen_model():
    a = unit(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    near = unit(a + 0.1)
    d = (a - near).square().sum(1).mean()
    assert bounded_distance(a, near, 2.15).item() == pytest.approx(d.item())
    assert bounded_distance(a, -a, 2.15).item() == 0  # 4 > tau: no term
    x = (-a).clone().requires_grad_(True)
    bounded_distance(x, a, 2.15).backward()
    assert not x.grad.any()  # and no gradient above the bound
    loss_fn = PARLoss(weight=0.5, bound=2.15)
    out = outputs(grad=True)
    out |= {"frozen_image": out["image"].detach().clone(), "frozen_text": out["text"].detach().clone()}
    loss, parts = loss_fn(out)
    assert parts["par_image"] == 0 and loss.item() == pytest.approx(parts["mmcl"].item())
    moved = out | {"frozen_image": unit(out["image"].detach() + 0.3), "frozen_text": unit(out["text"].detach() + 0.3)}
    loss2, parts2 = loss_fn(moved)
    assert 0 < parts2["par_image"] <= 2.15
    assert loss2.item() == pytest.approx(parts2["mmcl"].item() - 0.5 * (parts2["par_image"] + parts2["par_text"]).item())
    loss2.backward()  # the gradient of -w D moves the embeddings away from the frozen ones
    step = out["image"].detach() - 0.1 * out["image"].grad
    assert (step - moved["frozen_image"]).square().sum(1).mean() > parts2["par_image"]
    assert out["logit_scale"].grad is None  # the temperature is not trained


def test_par_keeps_a_frozen_copy_and_its_encoder_adds_its_embeddings():
    from core.model import build_model

    torch.manual_seed(0)
    model, _, tokenizer = build_model("vit-tiny", "mmcl")
    fresh, _, _ = build_model("vit-tiny", "mmcl")
    defence = get_defence("par")
    defence.prepare(model, fresh)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    batch = {"image": torch.randn(4, 3, 32, 32), "text": tokenizer(["a red circle"] * 4)}
    out = defence.encoder(model)(batch)
    assert {"frozen_image", "frozen_text"} <= out.keys() and not out["frozen_image"].requires_grad
    assert not torch.allclose(out["image"], out["frozen_image"])  # the copy did not move with the model
    with pytest.raises(ValueError, match="bound"):
        get_defence("par", bound=5.0)


# detectors and their metrics


def planted(n: int = 1000, poisons: int = 50, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, d))
    text = image + 0.3 * rng.normal(size=(n, d))
    is_poison = np.zeros(n, bool)
    is_poison[rng.choice(n, poisons, replace=False)] = True
    return image, text, is_poison, rng


def norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_similarity_ranks_mismatched_captions_first():
    image, text, is_poison, rng = planted()
    text[is_poison] = rng.normal(size=(is_poison.sum(), image.shape[1]))  # captions unrelated to their images
    m = detection_metrics(get_detector("similarity").score(norm(image), norm(text)), is_poison)
    assert m["auroc"] > 0.99 and m["recall_at_k"] > 0.9


def test_spectral_signature_finds_a_shifted_direction():
    image, text, is_poison, rng = planted()
    image[is_poison] += 5.0 * np.eye(image.shape[1])[0]  # the trigger's shared direction
    m = detection_metrics(get_detector("spectral").score(norm(image), norm(text)), is_poison)
    assert m["auroc"] > 0.95


def test_density_ranks_sparse_neighbourhoods_first():
    rng = np.random.default_rng(0)
    centre = np.array([1.0] + [0.0] * 7)
    clean = norm(centre + 0.1 * rng.normal(size=(950, 8)))  # one dense cluster
    sparse = norm(centre + 0.6 * norm(rng.normal(size=(50, 8))))  # on its fringe, each with clean neighbours
    image = np.concatenate([clean, sparse])
    is_poison = np.arange(1000) >= 950
    detector = get_detector("density", k=16, reference=400)
    scores = detector.score(image, image)
    assert scores.shape == (1000,) and np.isfinite(scores).all()
    assert detection_metrics(scores, is_poison)["auroc"] > 0.95
    with pytest.raises(ValueError, match="reference"):
        get_detector("density", k=16, reference=10)


def test_detection_metrics_known_values():
    y = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 1], bool)
    perfect = detection_metrics(y.astype(float), y)
    assert (perfect["auroc"], perfect["average_precision"], perfect["recall_at_k"], perfect["k"]) == (1.0, 1.0, 1.0, 3)
    reversed_ = detection_metrics(-y.astype(float), y)
    assert reversed_["auroc"] == 0.0 and reversed_["recall_at_k"] == 0.0
    one_swap = detection_metrics(np.array([0, 0, 0, 5, 4, 3.5, 0, 0, 0, 1]), y)
    assert one_swap["auroc"] == pytest.approx(20 / 21) and one_swap["recall_at_k"] == pytest.approx(2 / 3)
    assert one_swap["auroc_low"] < one_swap["auroc"] <= one_swap["auroc_high"] <= 1
    assert one_swap["poison_rate"] == 0.3
    with pytest.raises(ValueError, match="poisoned and clean"):
        detection_metrics([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="one score per pair"):
        detection_metrics([1.0], [True, False])
