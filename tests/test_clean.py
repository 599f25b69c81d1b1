"""The clean stage on tiny data: a 2 lr x 2 epoch sweep through Prefect and Ray, shrink-and-perturb,
a learning-rate-0 run that must leave every metric unchanged, and bad input."""
import json
import shutil
import re

import pytest
import torch

from defences.registry import get_defence
from flows.clean import clean_flow
from flows.common import make_task_runner
from tasks import clean
from tasks.config import ConfigError, RunnerConfig
from core.model import RunStopped, build_model, model_config
from core.data.shards import atomic_write_json, file_sha256
from tests.conftest import clean_params, poisoned_tiny

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Curated and poisoned tiny data, and a (randomly initialised) exported model to clean."""
    root = tmp_path_factory.mktemp("clean")
    raw = poisoned_tiny(root, train_pairs=160)
    models = root / "data" / "models" / "pretrain"
    for name in ("mmcl", "mmcl_ssl"):
        torch.manual_seed(0)
        model, _, _ = build_model("vit-tiny", "mmcl")
        (models / name).mkdir(parents=True)
        torch.save(model.state_dict(), models / name / "model.pt")
        atomic_write_json(models / name / "model_config.json", {"model": "vit-tiny", "objective": name,
                                                                "open_clip_config": model_config("vit-tiny")})
    return root, raw


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    import ray

    ray.shutdown()


def test_sweep_through_prefect_and_ray(setup, tmp_path, prefect_api_url):
    params = clean_params(setup, tmp_path)
    flow = clean_flow.with_options(task_runner=make_task_runner(params.clean.runner))
    (sweep,) = flow(params, [("mmcl", "cleanclip")])
    assert sweep["lrs"] == [1e-3, 3e-3] and len(sweep["points"]) == 2 * 2
    for p in sweep["points"]:
        assert {"accuracy", "asr", "clean_target_rate", "asr_excess", "loss", "lr", "epoch"} <= p.keys()
        assert 0 <= p["accuracy"] <= 1 and 0 <= p["asr"] <= 1
    cell = tmp_path / "clean" / "mmcl" / "cleanclip"
    assert sweep["pretrained"]["epoch"] == 0
    assert json.loads((cell / "sweep.json").read_text()) == sweep
    assert (cell / "best.pt").is_file() and not list(cell.glob("lr-*/best.pt"))  # only the frontier's best is kept
    for lr in ("0.001", "0.003"):
        assert [p["epoch"] for p in json.loads((cell / f"lr-{lr}" / "epochs.json").read_text())["points"]] == [0, 1, 2]


def test_finished_runs_are_kept_on_rerun(setup, tmp_path):
    params = clean_params(setup, tmp_path, lrs=[1e-3], epochs=1)
    first = clean.clean_run(params, "mmcl", "cleanclip", 1e-3)
    marker = clean.run_dir(params, "mmcl", "cleanclip", 1e-3) / "epochs.json"
    stamp = marker.stat().st_mtime_ns
    assert clean.clean_run(params, "mmcl", "cleanclip", 1e-3) == first and marker.stat().st_mtime_ns == stamp


def test_learning_rate_zero_changes_nothing(setup, tmp_path):
    params = clean_params(setup, tmp_path, epochs=2)
    result = clean.clean_run(params, "mmcl", "cleanclip", 0.0)
    metrics = ("accuracy", "top5", "asr", "asr_top5", "clean_target_rate")
    before = {k: result["points"][0][k] for k in metrics}
    for p in result["points"][1:]:
        assert {k: p[k] for k in metrics} == before


def test_shrink_perturb_moves_weights_by_the_expected_amount():
    torch.manual_seed(0)
    model, _, _ = build_model("vit-tiny", "mmcl")
    fresh, _, _ = build_model("vit-tiny", "mmcl")
    before = {k: v.clone() for k, v in model.named_parameters()}
    get_defence("shrink_perturb", shrink=0.9, perturb=0.01).prepare(model, fresh)
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        expected = before[name] if name == "logit_scale" else 0.9 * before[name] + 0.01 * fresh_params[name]
        assert torch.allclose(p, expected, atol=1e-7), name


def test_bad_input_is_rejected_before_training(setup, tmp_path):
    with pytest.raises(clean.CleanError, match="checkpoint not found"):
        clean.check_sweep(clean_params(setup, tmp_path, models=["siglip"]), "siglip", "cleanclip")
    root, _ = setup
    bad = root / "data" / "models" / "pretrain" / "broken"
    bad.mkdir(exist_ok=True)
    torch.save({"visual.wrong": torch.zeros(2)}, bad / "model.pt")
    atomic_write_json(bad / "model_config.json", {"model": "vit-tiny", "objective": "mmcl"})
    with pytest.raises(clean.CleanError, match="does not match model 'vit-tiny'"):
        clean.check_sweep(clean_params(setup, tmp_path), "broken", "cleanclip")
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_write_json(empty / "sizes.json", {})
    with pytest.raises(clean.CleanError, match="the cleaning subset has 0 pairs"):
        clean.check_sweep(clean_params(setup, tmp_path, data_dir=str(empty)), "mmcl", "cleanclip")
    with pytest.raises(ConfigError, match=r"learning rates must be positive, got \[0.0, -0.001\]"):
        clean_params(setup, tmp_path, lrs=[0.0, -1e-3, 1e-3])
    with pytest.raises(ConfigError, match="unknown defence 'fine-pruning'"):
        clean_params(setup, tmp_path, defences=["fine-pruning"])
    with pytest.raises(KeyError, match="known defences"):
        get_defence("nope")
    with pytest.raises(clean.CleanError, match=r"clean.defence_options.par: par: .*bound in \(0, 4\]"):
        clean.check_sweep(clean_params(setup, tmp_path, defences=["par"], defence_options={"par": {"bound": 9.0}}),
                          "mmcl", "par")
    assert make_task_runner(RunnerConfig(kind="thread")) is not None


def test_a_failed_run_does_not_lose_the_others(setup, tmp_path, prefect_api_url):
    """A real fault in one run (its folder's path is taken by a file): the other runs finish and are kept,
    the flow names the failed one, and a rerun trains only it."""
    params = clean_params(setup, tmp_path, lrs=[1e-3, 2e-3, 3e-3], epochs=1, runner={"kind": "thread", "workers": 2})
    blocked = clean.run_dir(params, "mmcl", "cleanclip", 2e-3)
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    flow = clean_flow.with_options(task_runner=make_task_runner(params.clean.runner))
    with pytest.raises(Exception, match=r"1 sweep run\(s\) failed: mmcl/cleanclip lr 0.002; the other runs finished"):
        flow(params, [("mmcl", "cleanclip")])
    kept = {lr: clean.run_dir(params, "mmcl", "cleanclip", lr) / "epochs.json" for lr in (1e-3, 3e-3)}
    stamps = {lr: marker.stat().st_mtime_ns for lr, marker in kept.items()}
    assert not (blocked.parent / "sweep.json").exists()

    blocked.unlink()
    (sweep,) = flow(params, [("mmcl", "cleanclip")])
    assert sweep["lrs"] == [1e-3, 2e-3, 3e-3] and len(sweep["points"]) == 3
    assert {lr: marker.stat().st_mtime_ns for lr, marker in kept.items()} == stamps  # not trained again


def test_a_diverged_run_is_left_out_and_never_chosen(setup, tmp_path):
    """lr 1e30 blows the weights up in one step: that run stops, naming where, and is no result."""
    params = clean_params(setup, tmp_path, lrs=[1e-3, 1e30], epochs=2)
    runs = [clean.clean_run(params, "mmcl", "cleanclip", lr) for lr in params.clean.lrs]
    assert "diverged" not in runs[0]
    assert re.fullmatch(r"the loss became nan at step \d+ \(epoch 1\)", runs[1]["diverged"]), runs[1]["diverged"]
    assert [p["epoch"] for p in runs[1]["points"]] == [0] and runs[1]["best"] is None
    sweep = clean.assemble_sweep(params, "mmcl", "cleanclip", runs)
    assert sweep["diverged"] == [{"lr": 1e30, "why": runs[1]["diverged"]}]
    assert {p["lr"] for p in sweep["points"]} == {1e-3} and sweep["best"]["lr"] == 1e-3
    config = json.loads((clean.cell_dir(params, "mmcl", "cleanclip") / "model_config.json").read_text())
    assert config["sha256"] == {"best.pt": file_sha256(clean.cell_dir(params, "mmcl", "cleanclip") / "best.pt")}

    fewer = clean_params(setup, tmp_path, lrs=[1e-3], epochs=2)  # the same sweep with fewer lrs, assembled again
    again = clean.assemble_sweep(fewer, "mmcl", "cleanclip", [clean.clean_run(fewer, "mmcl", "cleanclip", 1e-3)])
    assert again["best"] == sweep["best"] and (clean.cell_dir(params, "mmcl", "cleanclip") / "best.pt").is_file()

    alone = clean_params(setup, tmp_path / "alone", lrs=[1e30], epochs=1)
    with pytest.raises(RunStopped, match=r"every run of mmcl/cleanclip diverged \(lr 1e\+30: the loss became nan"):
        clean.assemble_sweep(alone, "mmcl", "cleanclip", [clean.clean_run(alone, "mmcl", "cleanclip", 1e30)])


def test_a_diverged_lr_of_1e30_goes_through_the_flow(setup, tmp_path, prefect_api_url):
    """Prefect artifact keys take [a-z0-9-]: lr 1e+30 must not break the flow after the runs."""
    params = clean_params(setup, tmp_path, lrs=[1e-3, 1e30], epochs=1, runner={"kind": "thread", "workers": 1})
    (sweep,) = clean_flow.with_options(task_runner=make_task_runner(params.clean.runner))(params, [("mmcl", "cleanclip")])
    assert [d["lr"] for d in sweep["diverged"]] == [1e30] and sweep["best"]["lr"] == 1e-3


def test_a_target_that_is_no_class_fails_the_preflight_check(setup, tmp_path, prefect_api_url):
    """The target comes with the eval sets (asr/attack.json, from the poison stage), not from params."""
    eval_dir = tmp_path / "eval"
    shutil.copytree(setup[0] / "data" / "poisoned" / "eval", eval_dir)
    attack = json.loads((eval_dir / "asr" / "attack.json").read_text())
    assert attack["target"] == "banana" and attack["trigger"]["name"] == "noise_patch"
    atomic_write_json(eval_dir / "asr" / "attack.json", attack | {"target": "durian"})
    params = clean_params(setup, tmp_path, eval_dir=str(eval_dir), runner={"kind": "thread", "workers": 1})
    flow = clean_flow.with_options(task_runner=make_task_runner(params.clean.runner))
    with pytest.raises(clean.CleanError, match=r"^clean.eval_dir: target 'durian' is not a class of .*; classes: \["):
        flow(params, [("mmcl", "cleanclip")])
    assert not clean.cell_dir(params, "mmcl", "cleanclip").exists()  # no run started


def test_a_finished_run_is_reused_only_for_the_same_computation(setup, tmp_path):
    """clean_run's identity: what the run computes (settings, data, model, lr), not how it runs. By hand
    (outside DVC) a changed clean.epochs trains again; a changed runner or eval batch size reuses the run."""
    params = clean_params(setup, tmp_path, epochs=1, lrs=[1e-3])
    first = clean.clean_run(params, "mmcl", "cleanclip", 1e-3)
    done = clean.run_dir(params, "mmcl", "cleanclip", 1e-3) / "epochs.json"
    stamp = done.stat().st_mtime_ns
    for how in ({"runner": {"kind": "thread", "workers": 1}}, {"eval_batch_size": 5, "threads_per_run": 2},
                {"lrs": [1e-3, 5e-3], "models": ["mmcl", "mmcl_ssl"]}):
        assert clean.clean_run(clean_params(setup, tmp_path, epochs=1, **how), "mmcl", "cleanclip", 1e-3) == first
    assert done.stat().st_mtime_ns == stamp
    again = clean.clean_run(clean_params(setup, tmp_path, epochs=2, lrs=[1e-3]), "mmcl", "cleanclip", 1e-3)
    assert again["run_id"] != first["run_id"] and [p["epoch"] for p in again["points"]] == [0, 1, 2]
    other = clean_params(setup, tmp_path, epochs=1, lrs=[1e-3], defence_options={"cleanclip": {"ssl": 2.0}})
    assert clean.run_identity(other, "mmcl", "cleanclip", 1e-3) != first["run_id"]
    moved = tmp_path / "eval"  # the same eval sets elsewhere: the same computation
    shutil.copytree(setup[0] / "data" / "poisoned" / "eval", moved)
    assert clean.run_identity(clean_params(setup, tmp_path, epochs=1, eval_dir=str(moved)), "mmcl", "cleanclip",
                              1e-3) == first["run_id"]
