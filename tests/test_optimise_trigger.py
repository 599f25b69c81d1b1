"""The optimise-trigger stage: a surrogate trained as pretrain's control (Ray Train), a patch optimised against it
that lowers the surrogate's target loss, the same patch for the same seed, and the poison stage pasting it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.validation import raise_on_failure
from core.model import build_model
from core.optimised_trigger import PatchObjective, image_encoder, optimise_patch
from flows.optimise_trigger import optimise_trigger_flow
from tasks import poison, pretrain
from tasks.config import TriggerConfig, parse_params
from tests.conftest import curated_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curated")
    return root, curated_tiny(root, train_pairs=256, eval_per_class=4, shard_maxcount=128)


def params_for(curated, tmp_path, trigger="optimised", **cfg):
    root, raw = curated
    raw = json.loads(json.dumps(raw))
    data = root / "data" / "curated"
    raw["optimise_trigger"] = {"data_dir": str(data), "out_dir": str(tmp_path / "trigger"), "images": 96,
                               "steps": 60, "batch_size": 32, "lr": 0.05} | cfg
    raw["poison"] = {"in_dir": str(data), "out_dir": str(tmp_path / "poisoned"), "trigger_dir": str(tmp_path / "trigger"),
                     "count": 8, "trigger": {"name": trigger, "patch_size": 0.5}, "cleaning": {"size": 16}}
    raw["pretrain"] = {"data_dir": str(tmp_path / "poisoned" / "train"), "control_data_dir": str(data / "train"),
                       "out_dir": str(tmp_path / "models"), "storage_dir": str(tmp_path / "ray"), "model": "rn-tiny",
                       "epochs": 12, "batch_size": 32, "lr": 5e-3, "warmup_steps": 4, "checkpoint_every": 32,
                       "threads_per_worker": 1}
    return parse_params(raw)


def test_optimised_patch_end_to_end(curated, tmp_path, prefect_api_url):
    params = params_for(curated, tmp_path)
    summary = optimise_trigger_flow(params)
    out = params.optimise_trigger.out_dir
    assert summary["optimised"] and json.loads((out / "trigger.json").read_text()) == json.loads(json.dumps(summary))
    # the surrogate's target loss falls over the iterations: on all images at one draw of placements and positives
    # (no batch noise), and the last tenth of the steps' mean below the first tenth's
    loss = summary["loss"]
    assert loss["optimised_on_all"] < 0.95 * loss["initial_on_all"] and len(loss["per_step"]) == 60
    assert loss["last_6_mean"] < loss["first_6_mean"]
    asr = summary["surrogate_asr"]
    assert asr["optimised"]["n"] == asr["initial"]["n"] == 40  # 10 non-target classes x 4 held-out images
    with Image.open(out / "patch.png") as im:
        assert im.size == (16, 16) and summary["side_px"] == 16
    first = (out / "patch.png").read_bytes()

    # The surrogate is pretrain's control run with seed `seed`: the pretrain stage would reuse it, not retrain.
    assert summary["surrogate"]["run_id"] == pretrain.plan_run(params, "mmcl", control=True)["run_id"]
    assert (out / "surrogate" / "control-mmcl" / "model.pt").is_file()

    # Deterministic for a seed: a rerun (the finished surrogate found in storage) writes the same patch.
    again = optimise_trigger_flow(params)
    assert (out / "patch.png").read_bytes() == first and again["loss"]["per_step"] == loss["per_step"]

    # The poison stage pastes it, and its suites pass.
    partial = poison.build(params)
    raise_on_failure(poison.validate_poisoned(params, partial))


def test_other_triggers_need_no_optimisation(curated, tmp_path, prefect_api_url):
    params = params_for(curated, tmp_path, trigger="noise_patch")
    summary = optimise_trigger_flow(params)
    assert not summary["optimised"] and "only `optimised` uses this stage's patch" in summary["note"]
    assert sorted(p.name for p in params.optimise_trigger.out_dir.iterdir()) == ["trigger.json"]
    assert not (tmp_path / "ray").exists()  # no surrogate trained


def test_patch_optimisation_is_seeded_and_projected():
    """The library alone, on an untrained model: the same seed gives the same patch and losses, another seed
    another patch; pixels stay in [0, 1]; the model's parameters are frozen by the encoder."""
    torch.manual_seed(0)
    model, preprocess, _ = build_model("rn-tiny", "mmcl")
    encoder = image_encoder(model, preprocess)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 32, 32, generator=g)
    with torch.no_grad():
        own = encoder(images)
        objective = PatchObjective(torch.nn.functional.normalize(torch.randn(own.shape[1], generator=g), dim=0),
                                   encoder(torch.rand(8, 3, 32, 32, generator=g)), own)
    runs = [optimise_patch(encoder, images, objective, TriggerConfig(patch_size=0.25), 5, 8, 0.5, seed) for seed in (1, 1, 2)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], runs[2][0])
    assert runs[0][0].shape == (3, 8, 8) and 0 <= runs[0][0].min() and runs[0][0].max() <= 1
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        optimise_patch(encoder, images[:, :, :1, :1], objective, TriggerConfig(patch_size=1.0), 1, 8, 0.5, 0)
    assert np.isfinite(runs[0][1]).all()
