"""core/model.py: gradient accumulation gives one pass's gradients, alone and under DDP with 2
gloo processes; weight decay by tensor rank."""
import socket

import pytest
import torch

from core.model import DualEncoder, build_model, encode_text, forward_backward, make_optimizer
from objectives.registry import get_objective

BATCH = 8


def batch(n=BATCH, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "text": torch.randint(1, 1000, (n, 32), generator=g),
            "image_aug": torch.rand(n, 3, 32, 32, generator=g), "text_aug": torch.randint(1, 1000, (n, 32), generator=g)}


def fresh_model(objective="mmcl_ssl"):
    torch.manual_seed(0)
    return build_model("vit-tiny", objective)[0]  # LayerNorm only: accumulation is exact


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_pass(objective: str) -> tuple[float, dict]:
    model = fresh_model(objective)
    loss, _ = forward_backward(DualEncoder(model), get_objective(objective), [batch()])
    return loss.item(), grads(model)


def micro(whole: dict, accum: int, rank: int = 0, world: int = 1) -> list[dict]:
    """As the loader cuts a global batch: `accum` micro-batches, each split over `world` workers."""
    size = BATCH // accum
    local = size // world
    return [{k: v[j * size + rank * local: j * size + (rank + 1) * local] for k, v in whole.items()} for j in range(accum)]


@pytest.mark.parametrize("objective", ["mmcl", "mmcl_ssl", "siglip"])  # siglip: a logit bias too
def test_accumulation_gives_the_gradients_of_one_pass(objective):
    loss, reference = one_pass(objective)
    model = fresh_model(objective)
    acc_loss, _ = forward_backward(DualEncoder(model), get_objective(objective), micro(batch(), accum=4))
    assert acc_loss.item() == pytest.approx(loss, rel=1e-5)
    assert reference.keys() == grads(model).keys()
    for name, g in grads(model).items():
        assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-6), name


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = fresh_model()
    ddp = DistributedDataParallel(DualEncoder(model))
    loss, _ = forward_backward(ddp, get_objective("mmcl_ssl"), micro(batch(), accum=2, rank=rank, world=world))
    if rank == 0:
        torch.save({"loss": loss, "grads": grads(model)}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_workers_times_two_micro_batches_equal_one_process(tmp_path):
    """pretrain.accum_steps: an optimiser step sees batch_size samples in all, whatever the workers
    and micro-batches (2 DDP processes x 2 micro-batches of 2 vs one process on all 8)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt", weights_only=True)
    loss, reference = one_pass("mmcl_ssl")
    assert result["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert result["grads"].keys() == reference.keys()
    for name, g in result["grads"].items():
        assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-6), name


def test_weight_decay_by_tensor_rank():
    """open_clip's rule: no decay for tensors of at most one dimension, whatever their name."""
    model = fresh_model()
    model.register_parameter("bn_like_matrix", torch.nn.Parameter(torch.zeros(2, 2)))  # a name the old rule skipped
    no_decay, decay = make_optimizer(model, 1e-3, 0.1, vit=True).param_groups
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim >= 2 for p in decay["params"])
    assert any(p is model.bn_like_matrix for p in decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


def test_accumulation_counts_each_sample_once_in_batchnorm_statistics():
    """rn-tiny (BatchNorm): the cached pass without gradients leaves the running statistics as one
    pass per micro-batch would."""
    torch.manual_seed(0)
    model = build_model("rn-tiny", "mmcl")[0]
    torch.manual_seed(0)
    twin = build_model("rn-tiny", "mmcl")[0]
    whole = {k: v for k, v in batch().items() if k in ("image", "text")}
    forward_backward(DualEncoder(model), get_objective("mmcl"), micro(whole, accum=2))
    with torch.no_grad():
        for mb in micro(whole, accum=2):
            DualEncoder(twin)(mb)
    bn = [n for n, _ in model.named_buffers() if "running_mean" in n]
    assert bn
    for name in bn:
        assert torch.allclose(dict(model.named_buffers())[name], dict(twin.named_buffers())[name]), name


@pytest.mark.parametrize("name", ["rn-tiny", "vit-tiny"])
def test_text_trimmed_to_the_longest_caption_gives_open_clips_embeddings_and_gradients(name):
    """encode_text runs only up to the batch's last end-of-text token; open_clip's runs the whole context."""
    torch.manual_seed(0)
    model, _, tokenizer = build_model(name, "mmcl")
    tokens = tokenizer(["a photo of a banana", "a red circle on a cluttered background with dots", "x"])
    assert int(tokens.argmax(dim=1).max()) + 1 < tokens.shape[1] // 2  # most of the context is padding
    grads = []
    for encode in (lambda t: model.encode_text(t, normalize=True), lambda t: encode_text(model, t)):
        model.zero_grad()
        out = encode(tokens)
        (out * torch.arange(out.shape[1])).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = grads
    assert torch.allclose(a, b, atol=1e-6) and ga.keys() == gb.keys()
    assert all(torch.allclose(ga[n], gb[n], rtol=0, atol=1e-5 * ga[n].abs().max()) for n in ga)  # float rounding
    lengths = []  # and it did run trimmed: the transformer saw the longest caption's tokens, not the context
    model.transformer.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    encode_text(model, tokens)
    assert lengths == [int(tokens.argmax(dim=1).max()) + 1]


def test_a_caption_and_its_view_in_one_text_pass_equal_two_passes():
    torch.manual_seed(0)
    model, _, tokenizer = build_model("rn-tiny", "mmcl_ssl")
    images = torch.randn(2, 3, 32, 32)
    batch = {"image": images, "image_aug": images.flip(-1), "text": tokenizer(["a red circle", "a blue square"]),
             "text_aug": tokenizer(["a red round circle on a table", "square"])}
    out = DualEncoder(model)(batch)
    assert torch.allclose(out["text"], encode_text(model, batch["text"]), atol=1e-6)
    assert torch.allclose(out["text_aug"], encode_text(model, batch["text_aug"]), atol=1e-6)
