"""Objectives against slow reference implementations, open_clip, gradcheck, and 2-process gloo."""
import math
import socket

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from objectives import WEIGHTS
from objectives.registry import REGISTRY, get_objective
from objectives.base import WeightedSum, clamp_logit_scale
from objectives.mmcl import MMCL
from objectives.ssl import SSL

BATCHES = [1, 2, 3, 7, 16]


def outputs(batch, dim=8, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda: F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1).requires_grad_(grad)  # noqa: E731
    return {"image": t(), "text": t(), "image_aug": t(), "text_aug": t(),
            "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=grad),
            "logit_bias": torch.tensor(-10.0, dtype=dtype, requires_grad=grad)}


# Slow references, written from the formulas with explicit loops.
def ref_infonce(a, b, s):
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([s * a[i] @ b[j] for j in range(n)])
        col = torch.stack([s * b[i] @ a[j] for j in range(n)])
        total = total + (torch.logsumexp(row, 0) - row[i]) + (torch.logsumexp(col, 0) - col[i])
    return total / (2 * n)


def ref_mmcl(o):
    return ref_infonce(o["image"], o["text"], o["logit_scale"].exp())


def ref_ssl(o):
    s = o["logit_scale"].exp()
    return 0.5 * (ref_infonce(o["image"], o["image_aug"], s) + ref_infonce(o["text"], o["text_aug"], s))


def ref_siglip(o):
    n, s, b = o["image"].shape[0], o["logit_scale"].exp(), o["logit_bias"]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (s * o["image"][i] @ o["text"][j] + b))
    return total / n


def ref_cyclip(o, cross=0.25, inmodal=0.25):
    I, T, n = o["image"], o["text"], o["image"].shape[0]
    c = sum((I[i] @ T[j] - I[j] @ T[i]) ** 2 for i in range(n) for j in range(n)) / n**2 * n
    m = sum((I[i] @ I[j] - T[i] @ T[j]) ** 2 for i in range(n) for j in range(n)) / n**2 * n
    return ref_mmcl(o) + cross * c + inmodal * m


def ref_mw_auc(o):
    I, T, n, s = o["image"], o["text"], o["image"].shape[0], o["logit_scale"].exp()
    if n < 2:
        return torch.tensor(0.0)
    i2t = [F.softplus(-s * (I[i] @ T[i] - I[i] @ T[j])) for i in range(n) for j in range(n) if i != j]
    t2i = [F.softplus(-s * (I[i] @ T[i] - I[j] @ T[i])) for i in range(n) for j in range(n) if i != j]
    return 0.5 * (sum(i2t) / len(i2t) + sum(t2i) / len(t2i))


REFERENCES = {"mmcl": ref_mmcl, "ssl": ref_ssl, "mmcl_ssl": lambda o: ref_mmcl(o) + ref_ssl(o), "siglip": ref_siglip,
              "cyclip": ref_cyclip, "mw_auc": ref_mw_auc}


def test_every_registered_objective_has_a_reference():
    assert set(REFERENCES) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(name, batch):
    o = outputs(batch, dtype=torch.float64)
    loss, parts = get_objective(name)(o)
    assert torch.allclose(loss, torch.as_tensor(REFERENCES[name](o), dtype=torch.float64), atol=1e-9, rtol=1e-9)
    assert parts and all(v.dim() == 0 and not v.requires_grad for v in parts.values())


@pytest.mark.parametrize("batch", BATCHES)
def test_mmcl_matches_open_clip(batch):
    o = outputs(batch)
    ours, _ = get_objective("mmcl")(o)
    theirs = ClipLoss()(o["image"], o["text"], o["logit_scale"].exp())
    assert abs(ours.item() - theirs.item()) < 1e-6


@pytest.mark.parametrize("batch", BATCHES)
def test_siglip_matches_open_clip(batch):
    o = outputs(batch)
    o["logit_scale"] = torch.tensor(math.log(10.0))
    ours, _ = get_objective("siglip")(o)
    theirs = SigLipLoss()(o["image"], o["text"], o["logit_scale"].exp(), o["logit_bias"])
    assert abs(ours.item() - theirs.item()) < 1e-6


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_gradcheck(name):
    o = outputs(3, dim=4, dtype=torch.float64, grad=True)
    obj = get_objective(name)
    keys = ["image", "text", "logit_scale"] + sorted(obj.views) + (["logit_bias"] if name == "siglip" else [])
    inputs = tuple(o[k] for k in keys)

    def f(*xs):
        return obj(dict(o, **dict(zip(keys, xs))))[0]

    assert torch.autograd.gradcheck(f, inputs)
    loss = f(*inputs)
    loss.backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


def test_weighted_sum_and_views():
    o = outputs(5)
    combo = get_objective("mmcl_ssl", mmcl=2.0, ssl=0.5)
    assert combo.views == {"image_aug", "text_aug"}
    loss, parts = combo(o)
    assert torch.allclose(loss, 2.0 * MMCL()(o)[0] + 0.5 * SSL()(o)[0])
    assert {"mmcl", "ssl", "ssl_image", "ssl_text", "loss"} <= parts.keys()
    custom = WeightedSum({"a": (1.0, get_objective("siglip")), "b": (0.1, get_objective("mw_auc"))})
    assert torch.allclose(custom(o)[0], get_objective("siglip")(o)[0] + 0.1 * get_objective("mw_auc")(o)[0])
    assert get_objective("mmcl").views == frozenset()


def test_registry_errors_are_clear():
    with pytest.raises(KeyError, match=r"unknown objective 'clip'; known objectives: \['cyclip', 'mmcl'"):
        get_objective("clip")
    with pytest.raises(TypeError, match=r"objective 'mmcl_ssl' takes weights \{'mmcl': 1.0, 'ssl': 1.0\}; unknown: \['sssl'\]"):
        get_objective("mmcl_ssl", sssl=1.0)
    o = outputs(4)
    del o["text_aug"]
    with pytest.raises(KeyError, match=r"objective 'ssl' needs views \['image_aug', 'text_aug'\]; outputs lack \['text_aug'\]"):
        get_objective("ssl")(o)
    with pytest.raises(KeyError, match="logit_bias"):
        get_objective("siglip")({k: v for k, v in outputs(2).items() if k != "logit_bias"})


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(p)
    assert p.item() == pytest.approx(math.log(100))
    p = torch.nn.Parameter(torch.tensor(-1.0))
    clamp_logit_scale(p)
    assert p.item() == 0.0


# Distributed: 2 gloo processes, each with half the global batch, must give the single-process loss
# and (after DDP's gradient averaging) the single-process parameter gradients.
GLOBAL_BATCH, IN_DIM, EMB_DIM = 6, 5, 4


def _encoders():
    torch.manual_seed(1)
    return {k: torch.nn.Linear(IN_DIM, EMB_DIM).double() for k in ("image", "text")}


def _global_inputs():
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=torch.float64)
            for k in ("image", "text", "image_aug", "text_aug")}


def _loss_and_grads(name, inputs, reduce=None):
    enc = _encoders()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    logit_bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64))
    o = {k: F.normalize(enc[k.split("_")[0]](x), dim=-1) for k, x in inputs.items()}
    o |= {"logit_scale": logit_scale, "logit_bias": logit_bias}
    loss, _ = get_objective(name)(o)
    loss.backward()
    params = [p for e in enc.values() for p in e.parameters()] + [logit_scale, logit_bias]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    if reduce:
        grads = [reduce(g) for g in grads]
    return loss.detach(), grads


def _dist_worker(rank, world_size, port, names, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    per = GLOBAL_BATCH // world_size
    local = {k: v[rank * per:(rank + 1) * per] for k, v in _global_inputs().items()}

    def ddp_average(g):
        g = g.clone()
        dist.all_reduce(g)
        return g / world_size

    results = {name: _loss_and_grads(name, local, ddp_average) for name in names}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_process_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = sorted(REGISTRY)
    out = tmp_path / "dist.pt"
    mp.spawn(_dist_worker, args=(2, port, names, str(out)), nprocs=2, join=True)
    dist_results = torch.load(out, weights_only=True)
    for name in names:
        loss, grads = _loss_and_grads(name, _global_inputs())
        d_loss, d_grads = dist_results[name]
        assert torch.allclose(d_loss, loss, atol=1e-12), name
        for a, b in zip(d_grads, grads):
            assert torch.allclose(a, b, atol=1e-10), name


def test_names_and_defaults_agree_with_the_implementations():
    """objectives.WEIGHTS and defences.OPTIONS (plain data, read by params validation) name exactly
    the registries' entries and the arguments each takes."""
    import inspect

    from defences import OPTIONS
    from defences.registry import REGISTRY as DEFENCES

    for names, registry in ((WEIGHTS, REGISTRY), (OPTIONS, DEFENCES)):
        assert set(names) == set(registry)
        for name, factory in registry.items():
            assert set(inspect.signature(factory).parameters) == set(names[name]), name
            assert all(p.default is inspect.Parameter.empty for p in inspect.signature(factory).parameters.values())
