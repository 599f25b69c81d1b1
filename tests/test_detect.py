"""The detect stage on a tiny poisoned corpus: every training pair scored by every detector under each
poisoned model, measured against the poison manifest; bad input named before any model is embedded."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.model import build_model
from tasks import detect
from tasks.config import ConfigError, parse_params
from tests.conftest import poisoned_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """64 pairs with 8 poisons, and two from-scratch vit-tiny exports (a poisoned model and a control)."""
    root = tmp_path_factory.mktemp("detect")
    raw = poisoned_tiny(root, train_pairs=64)
    for name in ("mmcl", "control-mmcl"):
        torch.manual_seed(0)
        model, _, _ = build_model("vit-tiny", "mmcl")
        (root / "models" / name).mkdir(parents=True)
        torch.save(model.state_dict(), root / "models" / name / "model.pt")
        (root / "models" / name / "model_config.json").write_text(json.dumps({"model": "vit-tiny", "objective": "mmcl"}))
    return root, raw


def params_for(setup, **cfg):
    root, raw = setup
    raw = json.loads(json.dumps(raw))
    raw["detect"] = {"data_dir": str(root / "data" / "poisoned" / "train"),
                     "manifest": str(root / "data" / "poisoned" / "poison_manifest.parquet"),
                     "models_dir": str(root / "models"), "out_dir": str(root / "detect"),
                     "metrics_dir": str(root / "metrics"), "detector_options": {"density": {"k": 4, "reference": 32}}} | cfg
    return parse_params(raw)


def test_scores_every_pair_of_every_poisoned_model(setup):
    params = params_for(setup)
    assert detect.models_of(params) == ["mmcl"]  # the control is not a poisoned model
    truth = detect.ground_truth(params)
    result = detect.detect_model(params, "mmcl", truth)
    scores = pq.read_table(setup[0] / "detect" / "mmcl" / "scores.parquet").to_pandas()
    assert len(scores) == result["pairs"] == 64 and scores["poisoned"].sum() == 8 == len(truth)
    assert set(scores["key"][scores["poisoned"]]) == truth
    assert list(scores.columns) == ["key", "poisoned", "similarity", "density", "spectral"]
    for name, m in result["detectors"].items():
        assert 0 <= m["auroc_low"] <= m["auroc"] <= m["auroc_high"] <= 1 and m["k"] == 8 and m["n"] == 64, name
    detect.write_metrics(params, {"mmcl": result})
    assert json.loads((setup[0] / "metrics" / "detection.json").read_text())["mmcl"]["pairs"] == 64


def test_bad_input_is_named_before_any_model_is_embedded(setup, tmp_path):
    root = setup[0]
    with pytest.raises(detect.DetectError, match=r"detect.manifest: .*missing.parquet"):
        detect.ground_truth(params_for(setup, manifest=str(tmp_path / "missing.parquet")))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"key": ["gen_train_999999999"]}), other)
    with pytest.raises(detect.DetectError, match=r"1 of its 1 poisoned keys are not in detect.data_dir"):
        params = params_for(setup, manifest=str(other))
        detect.detect_model(params, "mmcl", detect.ground_truth(params))
    with pytest.raises(detect.DetectError, match=r"detect.models: no poisoned model \['rn50'\]"):
        detect.models_of(params_for(setup, models=["rn50"]))
    with pytest.raises(detect.DetectError, match=r"detect.detector_options: density: k must be"):
        detect.ground_truth(params_for(setup, detector_options={"density": {"k": 0}}))
    with pytest.raises(ConfigError, match=r"detect.detector_options: .*density: \['kk'\] not accepted"):
        params_for(setup, detector_options={"density": {"kk": 3}})
    with pytest.raises(ConfigError, match=r"detect.detectors.*unknown detector 'lof'"):
        params_for(setup, detectors=["lof"])
    assert not (root / "detect" / "rn50").exists()
