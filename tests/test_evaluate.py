"""Metrics on hand-built models with known embeddings, the frontier on hand-written sweeps,
the report, and `dvc metrics show` / `dvc plots show` on our dvc.yaml."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.checkpoint import CheckpointError, load_model
from tasks import evaluate as ev
from tasks import report
from tasks.config import parse_params
from core.frontier import frontier, removes_backdoor
from core.metrics import EvalError, attack_metrics, evaluate, predict, retrieval_metrics
from core.data.loader import SampleCache
from core.model import build_model
from core.data.shards import ShardSink, atomic_write_json
from tests.conftest import REPO, png_bytes, tiny_params

CLASSES = ["banana", "apple", "car"]
TARGET = 0


def write_eval_set(folder: Path, triggered: bool, skip_target: bool) -> None:
    """Images whose red channel encodes the class (x 50); triggered ones have a white top-left pixel."""
    folder.mkdir(parents=True)
    sink = ShardSink(folder / "shard", maxcount=7)
    for i in range(30):
        cls = i % 3
        if skip_target and cls == TARGET:
            continue
        arr = np.zeros((8, 8, 3), np.uint8)
        arr[..., 0] = 50 * cls + 10
        if triggered:
            arr[0, 0] = 255
        key = f"e_{i:04d}"
        sink.write({"__key__": key, "png": png_bytes(Image.fromarray(arr)), "txt": f"a {CLASSES[cls]}".encode(),
                    "cls": str(cls).encode(), "json": b"{}"}, {"key": key, "cls": cls})
    atomic_write_json(folder / "sizes.json", {s["tar"]: s["n"] for s in sink.close()})
    atomic_write_json(folder / "classes.json", {"classnames": CLASSES, "templates": ["a {}.", "a photo of a {}."]})


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_eval_set(root / "labelled", triggered=False, skip_target=False)
    write_eval_set(root / "asr", triggered=True, skip_target=True)
    return root


def tokenizer(texts):
    """Class index of the class name each text mentions."""
    return torch.tensor([next(i for i, c in enumerate(CLASSES) if c in t) for t in texts])


def preprocess(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


class HandBuilt(torch.nn.Module):
    """Embeds an image as its class's one-hot (read from the red channel); `backdoor` sends triggered
    images to the target, `collapse` sends every image to the target."""

    def __init__(self, backdoor=False, collapse=False):
        super().__init__()
        self.backdoor, self.collapse = backdoor, collapse

    def encode_image(self, images, normalize=True):
        cls = ((images[:, 0, 4, 4] - 10) / 50).round().long()
        if self.backdoor:
            cls = torch.where(images[:, 1, 0, 0] == 255, TARGET, cls)
        if self.collapse:
            cls = torch.full_like(cls, TARGET)
        return torch.nn.functional.one_hot(cls, len(CLASSES)).float()

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(tokens, len(CLASSES)).float()


def test_perfect_model(eval_dirs):
    m = evaluate(HandBuilt(), preprocess, tokenizer, eval_dirs / "labelled", eval_dirs / "asr", "banana")
    assert m["zero_shot"]["top1"] == 1.0 and m["zero_shot"]["per_class"] == {c: 1.0 for c in CLASSES}
    assert m["attack"]["asr"] == 0.0 and m["attack"]["clean_target_rate"] == 0.0 and m["attack"]["n_asr"] == 20
    assert m["attack"]["n_clean_target"] == 20  # the ASR images untriggered
    assert m["retrieval"]["i2t_r@10"] > 0


def test_backdoored_model(eval_dirs):
    m = evaluate(HandBuilt(backdoor=True), preprocess, tokenizer, eval_dirs / "labelled", eval_dirs / "asr", "banana")
    assert m["zero_shot"]["top1"] == 1.0
    assert m["attack"]["asr"] == 1.0 and m["attack"]["clean_target_rate"] == 0.0 and m["attack"]["asr_excess"] == 1.0


def test_metrics_are_the_same_for_any_loader_processes_and_retrieval_chunk(eval_dirs):
    """Decoding in 3 loader processes (batches of 4 over 30 images: 8 batches, uneven) gives every metric
    to the last digit; retrieval ranked 7 rows at a time equals one 30 x 30 matrix."""
    torch.manual_seed(0)
    model, image_preprocess, text_tokenizer = build_model("vit-tiny", "mmcl")
    model.eval()
    runs = [evaluate(model, image_preprocess, text_tokenizer, eval_dirs / "labelled", eval_dirs / "asr", "banana",
                     batch_size=4, loader_workers=w) for w in (0, 3)]
    assert runs[0] == runs[1] and runs[0]["zero_shot"]["n"] == 30
    weights = torch.nn.functional.normalize(torch.randn(model.text_projection.shape[1], 3), dim=0)
    pred = predict(model, weights, eval_dirs / "labelled", image_preprocess, "cpu", 4, with_text=True)
    assert retrieval_metrics(model, text_tokenizer, pred, "cpu", chunk=7) == runs[0]["retrieval"]


def test_an_evaluation_from_the_cache_reads_no_tar_and_gives_the_same_metrics(eval_dirs, tmp_path):
    shutil.copytree(eval_dirs, tmp_path / "eval")
    torch.manual_seed(0)
    model, image_preprocess, text_tokenizer = build_model("vit-tiny", "mmcl")
    model.eval()
    cache = SampleCache(limit_mb=16)
    runs = [evaluate(model, image_preprocess, text_tokenizer, tmp_path / "eval" / "labelled", tmp_path / "eval" / "asr",
                     "banana", batch_size=4, cache=cache)]
    for tar in (tmp_path / "eval").glob("*/*.tar"):
        tar.write_bytes(b"")
    runs.append(evaluate(model, image_preprocess, text_tokenizer, tmp_path / "eval" / "labelled",
                         tmp_path / "eval" / "asr", "banana", batch_size=4, cache=cache))
    assert runs[0] == runs[1] and runs[0]["zero_shot"]["n"] == 30


def test_collapsed_model_is_a_bias_not_a_backdoor(eval_dirs):
    m = evaluate(HandBuilt(collapse=True), preprocess, tokenizer, eval_dirs / "labelled", eval_dirs / "asr", "banana")
    assert m["zero_shot"]["top1"] == pytest.approx(1 / 3)
    assert m["attack"]["asr"] == 1.0 and m["attack"]["clean_target_rate"] == 1.0 and m["attack"]["asr_excess"] == 0.0


def test_bad_eval_input(eval_dirs, tmp_path):
    with pytest.raises(EvalError, match="not a class of"):
        evaluate(HandBuilt(), preprocess, tokenizer, eval_dirs / "labelled", eval_dirs / "asr", "zebra")
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(EvalError, match="no classes.json"):
        evaluate(HandBuilt(), preprocess, tokenizer, tmp_path / "noclasses", None, None)
    empty = {"keys": [], "labels": np.array([]), "top5": np.zeros((0, 5), int)}
    with pytest.raises(EvalError, match="the ASR set is empty"):
        attack_metrics(empty, empty, 0)


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    torch.save({"visual.nonsense": torch.zeros(3)}, tmp_path / "model.pt")
    atomic_write_json(tmp_path / "model_config.json", {"model": "rn-tiny", "objective": "mmcl"})
    with pytest.raises(CheckpointError, match="does not match model 'rn-tiny'"):
        load_model(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "other" / "model.pt")
    (tmp_path / "other").mkdir()
    torch.save({}, tmp_path / "other" / "model.pt")
    with pytest.raises(CheckpointError, match="no model_config.json beside it"):
        load_model(tmp_path / "other" / "model.pt")


SWEEP = [  # (lr, epoch, accuracy, asr, clean target rate)
    (1e-4, 1, 0.50, 0.90, 0.02), (1e-4, 2, 0.51, 0.60, 0.02), (1e-3, 1, 0.49, 0.20, 0.01),
    (1e-3, 2, 0.485, 0.04, 0.01), (1e-2, 1, 0.40, 0.008, 0.0), (1e-2, 2, 0.42, 0.009, 0.0),
]
POISONED = {"accuracy": 0.50, "asr": 0.95, "clean_target_rate": 0.02}


def sweep_points():
    return [dict(zip(("lr", "epoch", "accuracy", "asr", "clean_target_rate"), p)) for p in SWEEP]


def test_frontier_on_hand_written_sweep():
    f = frontier(sweep_points(), POISONED)
    best = {t: (p or {}).get("accuracy") for t, p in f["best_accuracy_at_asr"].items()}
    assert best == {"0.01": 0.42, "0.05": 0.485, "0.1": 0.485, "0.25": 0.49}
    low = f["lowest_asr_within_accuracy_drop"]
    assert low["0.01"]["asr"] == 0.20 and low["0.02"]["asr"] == 0.04 and low["0.02"]["clean_target_rate"] == 0.01
    assert removes_backdoor(f) and not removes_backdoor(f, drop="0.01")
    assert frontier([], POISONED)["best_accuracy_at_asr"]["0.05"] is None


def test_report_renders_table_figures_and_verdict(tmp_path):
    raw = tiny_params(tmp_path, [])
    raw["evaluate"] = {"models_dir": str(tmp_path / "models"), "report_dir": str(tmp_path / "reports")}
    params = parse_params(raw)
    (tmp_path / "models" / "mmcl").mkdir(parents=True)
    (tmp_path / "models" / "mmcl" / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5 - s / 10}) + "\n" for s in range(1, 11)))
    pretrained = {"mmcl": POISONED | {"top5": 0.9, "asr_excess": 0.93}, "control-mmcl": {"accuracy": 0.51, "top5": 0.9}}
    sweeps = {"mmcl/cleanclip": {"defence": "cleanclip", "points": sweep_points()}}
    cells = ev.cells(pretrained, sweeps)
    assert cells["mmcl/cleanclip"]["control_accuracy"] == 0.51
    path = report.write_report(params, {"target": "banana", "trigger": {"name": "noise_patch"}}, pretrained, sweeps, cells)
    text = path.read_text()
    assert "Target: `banana`; attack: trigger `noise_patch`. CTR is the clean target rate" in text
    assert "| mmcl | cleanclip | 50.0 / 95.0 (2.0) | 51.0 | 42.0 | 48.5 | 48.5 | 49.0 | 20.0 | 4.0 | 4.0 |" in text
    assert "| ASR >= 90% | mmcl | 95.0 | yes |" in text
    assert "| cleanclip: ASR <= 10% within 3 pts of accuracy | mmcl | 4.0 at 48.5 | yes |" in text
    assert "removes the backdoor: ASR 4.0% (clean target rate 1.0%) at accuracy 48.5%" in text
    assert "CC6M | MMCL+SSL | 23.86 / 99.45 | 13.05" in text
    for fig in ("frontier-mmcl-cleanclip.png", "train-loss.png"):
        assert f"figures/{fig}" in text and (tmp_path / "reports" / "figures" / fig).stat().st_size > 1000
    caption = {"target": "banana", "trigger": {"name": "caption"}, "source_class": "apple"}
    assert "ASR is the share of the `apple` eval images predicted as the target" in report.write_report(
        params, caption, pretrained, sweeps, cells).read_text()


def test_shape_checks_from_the_numbers():
    pretrained = {"mmcl": {"accuracy": 0.60, "asr": 0.95, "asr_excess": 0.94, "chance": 1 / 11},
                  "mmcl_ssl": {"accuracy": 0.20, "asr": 0.85, "asr_excess": 0.70, "chance": 1 / 11},
                  "control-mmcl": {"accuracy": 0.62, "asr": 0.01, "asr_excess": 0.0, "chance": 1 / 11}}
    cells = {"mmcl/cleanclip": frontier(sweep_points(), POISONED) | {"pretrained": "mmcl", "defence": "cleanclip"}}
    rows = {(r["check"], r["model"]): (r["value"], r["met"]) for r in report.shape_checks(pretrained, cells)}
    assert rows[("ASR >= 90%", "mmcl")] == ("95.0", "yes") and rows[("ASR >= 90%", "mmcl_ssl")] == ("85.0", "NO")
    assert rows[("ASR - clean target rate >= 80 pts", "mmcl_ssl")][1] == "NO"
    assert rows[("accuracy >= 3x chance", "mmcl")] == ("60.0 (chance 9.1)", "yes")
    assert rows[("accuracy >= 3x chance", "mmcl_ssl")][1] == "NO"
    assert rows[("accuracy within 3 pts of the unpoisoned control", "mmcl")] == ("-2.0 pts", "yes")
    assert rows[("accuracy within 3 pts of the unpoisoned control", "mmcl_ssl")] == ("-42.0 pts", "NO")
    assert rows[("cleanclip: ASR <= 10% within 3 pts of accuracy", "mmcl")] == ("4.0 at 48.5", "yes")
    assert not any(model == "control-mmcl" for _, model in rows)


def test_verdict_flags_a_backdoor_that_never_took_hold():
    cell = frontier(sweep_points(), {"accuracy": 0.5, "asr": 0.3, "clean_target_rate": 0.25})
    text = report.verdict({}, {"x": cell | {"pretrained": "mmcl", "defence": "cleanclip", "control_accuracy": None}})
    assert "never took hold" in text


@pytest.mark.integration
def test_dvc_metrics_and_plots_show(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    params = parse_params(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    os.chdir(tmp_path)
    try:
        pretrained = {"mmcl": POISONED | {"top5": 0.9}}
        sweeps = {"mmcl/cleanclip": {"defence": "cleanclip", "points": sweep_points()}}
        Path("data/metrics").mkdir(parents=True)
        atomic_write_json(Path("data/metrics/pretrain.json"), pretrained)
        atomic_write_json(Path("data/metrics/frontier.json"), ev.cells(pretrained, sweeps))
        ev.write_plots(params, sweeps)
        shown = subprocess.run(["dvc", "metrics", "show"], capture_output=True, text=True, env=env, check=True).stdout
        assert "data/metrics/pretrain.json" in shown and "0.95" in shown
        subprocess.run(["dvc", "plots", "show", "-o", "plots_html"], capture_output=True, text=True, env=env, check=True)
        html = Path("plots_html/index.html").read_text()
        assert "data_plots_frontier_csv" in html and "data_plots_train_loss_csv" in html
    finally:
        os.chdir(REPO)


def test_verdict_names_the_control_floor_and_ranks_the_models():
    def cell(pretrained, asr_shift):
        points = [p | {"asr": min(1.0, p["asr"] + asr_shift)} for p in sweep_points()]
        return frontier(points, POISONED) | {"pretrained": pretrained, "defence": "cleanclip", "control_accuracy": 0.5}

    text = report.verdict({}, {"mmcl/cleanclip": cell("mmcl", 0.0), "mmcl_ssl/cleanclip": cell("mmcl_ssl", 0.3),
                               "control-mmcl/cleanclip": cell("control-mmcl", 0.02)})
    assert "on the unpoisoned control-mmcl model (a control: ASR 95.0% from the trigger alone) gives 6.0% within 3" in text
    assert "leaves ASR at 4.0% (mmcl), 34.0% (mmcl_ssl): the mmcl_ssl model keeps the most of its backdoor" in text


def test_verdict_gives_the_lowest_asr_of_the_widest_accuracy_drop_it_names():
    points = [{"accuracy": 0.49, "asr": 0.9, "clean_target_rate": 0.0, "lr": 1e-3, "epoch": 1},
              {"accuracy": 0.475, "asr": 0.4, "clean_target_rate": 0.0, "lr": 1e-3, "epoch": 2}]
    cell = frontier(points, {"accuracy": 0.5, "asr": 1.0, "clean_target_rate": 0.0})
    text = report.verdict({}, {"x": cell | {"pretrained": "mmcl", "defence": "cleanclip", "control_accuracy": None}})
    assert "lowest ASR within 3 points of accuracy: 40.0%" in text  # the 2.5-point drop, not the 1-point one
