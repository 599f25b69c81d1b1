"""Pre-training with real Ray Train workers on tiny data: 2 workers, resume after a kill,
1 vs 2 workers on the same global batch, uneven shards, and bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from objectives import WEIGHTS
from objectives.registry import REGISTRY
from objectives.base import Objective
from core.model import build_model, lr_factor, make_optimizer
from defences.registry import get_pretraining_defence
from tasks import pretrain
from tasks.config import parse_params
from core.data.shards import file_sha256
from core.errors import InputError
from tests.conftest import REPO, complete_checkpoints, curated_tiny, log_of, write_params
from tests.conftest import pretrain_params as params_with

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """192 curated pairs in 3 shards of 64 (3 shards over 2 workers: uneven on purpose)."""
    root = tmp_path_factory.mktemp("pretrain")
    return root, curated_tiny(root, train_pairs=192, eval_per_class=2, shard_maxcount=64)


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    import ray

    ray.shutdown()


def test_two_workers_train_checkpoint_and_export(data, tmp_path):
    params = params_with(data, tmp_path, num_workers=2, epochs=3, objectives=["mmcl_ssl"])
    metrics = pretrain.train(params, "mmcl_ssl")
    out = tmp_path / "models" / "mmcl_ssl"
    assert metrics["steps"] == 3 * (192 // 32) and metrics["workers"] == 2
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 19))
    assert {"mmcl", "ssl", "ssl_image", "ssl_text", "lr", "logit_scale"} <= log[0].keys()
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])  # the loss falls
    state = torch.load(out / "model.pt", weights_only=True)
    model, _, _ = build_model("vit-tiny", "mmcl_ssl")
    model.load_state_dict(state)
    # the optimiser state stays in the run's storage; the export holds the model only
    assert not (out / "checkpoint").exists() and max(complete_checkpoints(tmp_path / "ray")) == 18
    assert json.loads((out / "model_config.json").read_text())["open_clip_config"]["vision_cfg"]["patch_size"] == 8
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == log[-1]["loss"]


def test_workers_and_accumulation_give_the_same_steps(data, tmp_path):
    """pretrain.batch_size is the samples of one optimiser step whatever num_workers and accum_steps:
    2 Ray Train workers x 2 micro-batches of 8 train like one worker on batches of 32, step by step
    (every loss of the 6 steps agrees; vit-tiny has no BatchNorm, so the gradients agree to rounding).
    Decoding in 2 loader processes per Train worker gives the same losses to the last bit."""
    losses = {}
    for workers, accum, loaders in ((1, 1, 0), (2, 2, 0), (2, 2, 2)):
        out = tmp_path / f"{workers}x{accum}x{loaders}"
        pretrain.train(params_with(data, out, num_workers=workers, accum_steps=accum, epochs=1, loader_workers=loaders),
                       "mmcl_ssl")
        losses[workers, accum, loaders] = [r["loss"] for r in log_of(out / "models" / "mmcl_ssl")]
    assert len(losses[1, 1, 0]) == 192 // 32
    assert losses[2, 2, 0] == pytest.approx(losses[1, 1, 0], abs=1e-4)
    assert losses[2, 2, 2] == losses[2, 2, 0]


def test_run_identity_holds_what_changes_the_result_only(data, tmp_path):
    """A rerun resumes exactly when it should: the run id ignores logging, checkpoint cadence, threads and
    concurrency; it changes with what a run computes (the worker count too: float rounding of the
    reductions, and other batches under the shards split)."""
    params = params_with(data, tmp_path)
    run_id = lambda **changes: pretrain.plan_run(params_with(data, tmp_path, **changes), "mmcl")["run_id"]  # noqa: E731
    same = [run_id(log_every=1, checkpoint_every=3, keep_checkpoints=5), run_id(concurrent_runs=3),
            run_id(threads_per_worker=2, max_failures=0, loader_workers=3), run_id(controls=[], objectives=["mmcl_ssl"]),
            run_id(split="samples"),  # what `auto` is for one worker
            run_id(weights={"mmcl_ssl": {"ssl": 2.0}})]  # another objective's weights
    assert set(same) == {pretrain.plan_run(params, "mmcl")["run_id"]}
    changed = [run_id(epochs=3), run_id(accum_steps=2), run_id(lr=3e-3), run_id(batch_size=16), run_id(split="shards"),
               run_id(weight_decay=0.0), run_id(model="rn-tiny"), run_id(num_workers=2), run_id(use_gpu=False),
               run_id(compile=True)]
    assert len(set(changed) | set(same)) == len(changed) + 1
    # the weights a run trains with, however they are written: defaults spelled out are the defaults
    ssl_id = lambda **changes: pretrain.plan_run(params_with(data, tmp_path, **changes), "mmcl_ssl")["run_id"]  # noqa: E731
    assert ssl_id(weights={"mmcl_ssl": {"mmcl": 1.0, "ssl": 1.0}}) == ssl_id() != ssl_id(weights={"mmcl_ssl": {"ssl": 2.0}})


def test_uneven_shards_split_by_shard_finish(data, tmp_path):
    """3 shards on 2 workers with the `shards` split: every worker runs the same number of steps."""
    params = params_with(data, tmp_path, num_workers=2, epochs=2, split="shards")
    assert pretrain.train(params, "mmcl")["steps"] == 2 * 6


def test_resume_after_kill(data, tmp_path, prefect_api_url):
    params = params_with(data, tmp_path, epochs=6, checkpoint_every=3, log_every=1)
    path = write_params(tmp_path / "params.yaml", params.model_dump(mode="json"))
    cmd = [sys.executable, "-m", "flows.pretrain", "--params", str(path), "--objective", "mmcl"]
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    storage = tmp_path / "ray"
    deadline = time.time() + 300
    while not complete_checkpoints(storage) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = max(complete_checkpoints(storage))
    assert saved < 36, "the run finished before it was killed"

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from checkpoint at step" in rerun.stdout + rerun.stderr
    log = log_of(tmp_path / "models" / "mmcl")
    assert [r["step"] for r in log] == list(range(1, 37))  # no step lost or repeated


def test_bad_input_is_rejected_before_training(data, tmp_path):
    with pytest.raises(InputError, match="open_clip knows no model 'rn-huge'"):
        pretrain.plan_run(params_with(data, tmp_path, model="rn-huge"), "mmcl")
    with pytest.raises(pretrain.PretrainError, match=r"pretrain.batch_size=256 is larger than the dataset \(192"):
        pretrain.plan_run(params_with(data, tmp_path, batch_size=256), "mmcl")

    class NeedsDepth(Objective):
        views = frozenset({"depth_aug"})

    REGISTRY["needs_depth"], WEIGHTS["needs_depth"] = NeedsDepth, {}
    try:
        with pytest.raises(pretrain.PretrainError, match=r"needs views \['depth_aug'\] that the loader cannot build"):
            pretrain.plan_run(params_with(data, tmp_path), "needs_depth")
    finally:
        del REGISTRY["needs_depth"], WEIGHTS["needs_depth"]
    with pytest.raises(Exception, match="unknown objective 'clip'"):
        params_with(data, tmp_path, objectives=["clip"])
    with pytest.raises(Exception, match="must be divisible by num_workers"):
        params_with(data, tmp_path, batch_size=33, num_workers=2)


def test_resume_from_another_model_config_is_refused(data, tmp_path):
    params = params_with(data, tmp_path)
    run = pretrain.plan_run(params, "mmcl")
    model, _, _ = build_model("vit-tiny", "mmcl")
    opt = make_optimizer(model, 1e-3, 0.1, vit=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    none = get_pretraining_defence("none")
    pretrain._save_checkpoint(tmp_path, model, opt, sched, none, {"step": 1, "epoch": 0, "batch": 1},
                              dict(run, model_config={"other": "config"}))
    with pytest.raises(pretrain.PretrainError, match="saved from another model config"):
        pretrain._load_checkpoint(tmp_path, model, opt, sched, none, run)


def test_lr_schedule_and_weight_decay_groups(data, tmp_path):
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    params = params_with(data, tmp_path)
    model, _, _ = build_model("rn-tiny", "mmcl")
    opt = make_optimizer(model, params.pretrain.lr, params.pretrain.weight_decay, vit=False)
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and opt.defaults["betas"] == (0.9, 0.999)


def test_concurrent_runs_then_only_new_runs_train(data, tmp_path, prefect_api_url):
    """Two runs train at once; rerun with one more objective (DVC removes the outputs first): the finished
    runs are exported again from their last checkpoint, unchanged, and only the new one trains."""
    def flow(objectives):
        params = params_with(data, tmp_path, epochs=1, objectives=objectives, controls=["mmcl"], concurrent_runs=2)
        path = write_params(tmp_path / "params.yaml", params.model_dump(mode="json"))
        proc = subprocess.run([sys.executable, "-m", "flows.pretrain", "--params", str(path)], cwd=REPO,
                              env=dict(os.environ, PREFECT_API_URL=prefect_api_url), capture_output=True, text=True,
                              timeout=500)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    first = flow(["mmcl"])
    models = tmp_path / "models"
    assert "trained mmcl:" in first and "trained control-mmcl:" in first
    before = {name: (models / name / "model.pt").read_bytes() for name in ("mmcl", "control-mmcl")}
    shutil.rmtree(models)
    second = flow(["mmcl", "siglip"])
    for label in ("mmcl", "control-mmcl"):  # the finished runs: nothing left to train
        assert f"[{label}] resumed from checkpoint at step 6 " in second
    assert "[siglip] resumed" not in second
    assert {name: (models / name / "model.pt").read_bytes() for name in before} == before
    assert [r["step"] for r in log_of(models / "siglip")] == list(range(1, 7))
    assert [r["step"] for r in log_of(models / "mmcl")] == list(range(1, 7))


def test_new_data_is_a_new_run(data, tmp_path):
    root, _ = data
    params = params_with(data, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(root / "data" / "curated" / "train", other)
    manifest = sorted(other.glob("*.parquet"))[0]
    table = pq.read_table(manifest)
    captions = table.column("caption").to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption",
                                    pa.array(["a new caption"] + captions[1:])), manifest)
    changed = parse_params(params.model_dump(mode="json") | {
        "pretrain": params.pretrain.model_dump(mode="json") | {"data_dir": str(other)}})
    copy = parse_params(params.model_dump(mode="json") | {
        "pretrain": params.pretrain.model_dump(mode="json") | {"data_dir": str(other), "lr": 2e-3}})
    assert pretrain.plan_run(params, "mmcl")["run_id"] != pretrain.plan_run(changed, "mmcl")["run_id"]
    assert pretrain.plan_run(changed, "mmcl")["run_id"] == pretrain.plan_run(copy, "mmcl")["run_id"]


@pytest.mark.parametrize("workers", [1, 2])
def test_divergence_stops_the_run_naming_step_and_lr(data, tmp_path, workers):
    """lr 1e30: the weights overflow after the first step; every worker stops at once (none is left
    waiting in a collective), the run is not retried (Ray's max_failures would resume it into the
    same divergence) and exports nothing."""
    params = params_with(data, tmp_path, lr=1e30, warmup_steps=0, max_failures=2, num_workers=workers)
    with pytest.raises(pretrain.RunStopped, match=r"^pretrain run mmcl \(mmcl-[0-9a-f]{12}\): the loss became nan at "
                                                  r"step 2 \(epoch 0, batch 1, lr 9.8\de\+29\); lower pretrain.lr"):
        pretrain.train(params, "mmcl")
    assert not (tmp_path / "models" / "mmcl").exists()


def test_resume_skips_a_damaged_checkpoint(data, tmp_path, capfd):
    """The latest checkpoint cut short (a copy that never finished): a rerun says so, resumes from the
    one before and ends with the same model as the uninterrupted run."""
    params = params_with(data, tmp_path, checkpoint_every=4)  # 12 steps: checkpoints at 8 and 12 are kept
    pretrain.train(params, "mmcl")
    model = tmp_path / "models" / "mmcl" / "model.pt"
    exported = file_sha256(model)
    assert json.loads((model.parent / "model_config.json").read_text())["sha256"] == {"model.pt": exported}
    latest = sorted((tmp_path / "ray").glob("mmcl-*/checkpoint_*/state.pt"))[-1].parent
    state = (latest / "state.pt").read_bytes()
    (latest / "state.pt").write_bytes(state[: len(state) // 2])
    capfd.readouterr()
    pretrain.train(params, "mmcl")
    out = capfd.readouterr().out
    assert f"skipping a damaged checkpoint: {latest / 'state.pt'} does not match the sha256 in its meta.json" in out
    assert "resumed from checkpoint at step 8 (epoch 1, batch 2; checkpoint_" in out
    assert file_sha256(model) == exported
    assert [r["step"] for r in log_of(model.parent)] == list(range(1, 13))


def test_resume_finds_checkpoints_that_ray_did_not_record(data, tmp_path, capfd):
    """Killed after a checkpoint was copied but before Ray recorded it (its snapshot lost): the rerun
    finds the checkpoint in the run's storage folder, resumes there and exports the same model."""
    params = params_with(data, tmp_path, checkpoint_every=4)
    pretrain.train(params, "mmcl")
    model = tmp_path / "models" / "mmcl" / "model.pt"
    exported = file_sha256(model)
    for snapshot in (tmp_path / "ray").glob("mmcl-*/checkpoint_manager_snapshot.json"):
        snapshot.unlink()
    capfd.readouterr()
    pretrain.train(params, "mmcl")
    assert "resumed from checkpoint at step 12 (epoch 2, batch 0; checkpoint_" in capfd.readouterr().out
    assert file_sha256(model) == exported


@pytest.mark.parametrize("defence,options", [("roclip", {"pool": 64, "every": 2}), ("safeclip", {"warmup": 1, "crossmodal": 1})])
def test_pretraining_defences_train_alike_on_one_and_two_workers(data, tmp_path, defence, options):
    """RoCLIP's pool and SafeCLIP's split are built from global (gathered) values: 2 Ray Train workers train
    step by step as 1 does (vit-tiny: no BatchNorm), and the defence acts where it should. Their state
    travels in the checkpoint: resumed inside a matching (RoCLIP) or split (SafeCLIP) epoch, a run ends with
    the uninterrupted run's model."""
    logs = {}
    for workers in (1, 2):
        out = tmp_path / str(workers)
        params = params_with(data, out, num_workers=workers, epochs=4, defences=["none", defence],
                             defence_options={defence: options})
        run = pretrain.plan_run(params, "mmcl", defence=defence)
        assert run["label"] == f"mmcl+{defence}" and run["run_id"] != pretrain.plan_run(params, "mmcl")["run_id"]
        metrics = pretrain.train(params, "mmcl", defence=defence)
        assert metrics["defence"] == defence
        logs[workers] = log_of(out / "models" / f"mmcl+{defence}")
    assert [r["loss"] for r in logs[2]] == pytest.approx([r["loss"] for r in logs[1]], abs=1e-4)
    log = logs[1]
    if defence == "roclip":  # epochs 2 and 4 (of 1-4) match captions from the pool; 1 and 3 train as they are
        assert [int("roclip_matched" in r) for r in log] == [0] * 6 + [1] * 6 + [0] * 6 + [1] * 6
    else:  # the warm-up is unimodal (SSL only), then the objective on every pair; then on the safe pairs, SSL on
        # the risky ones
        assert all("mmcl" not in r and "ssl" in r for r in log[:6])
        assert all("mmcl" in r and r["safeclip_risky"] == 0 for r in log[6:12])
        assert all("safeclip_risky" in r for r in log[12:]) and sum(r["safeclip_risky"] for r in log[12:]) > 0
    with pytest.raises(InputError, match="controls are trained without"):
        pretrain.plan_run(params, "mmcl", control=True, defence=defence)
    too_few = {"roclip": 1, "safeclip": 2}[defence]  # epochs in which it would never act
    with pytest.raises(InputError, match=rf"pretrain.epochs={too_few}: {defence} .*\({defence}\."):
        pretrain.plan_run(params_with(data, tmp_path, epochs=too_few, defence_options={defence: options}), "mmcl",
                          defence=defence)
    bad = {"roclip": {"pool": 0}, "safeclip": {"threshold": 1.5}}[defence]
    with pytest.raises(InputError, match=rf"pretrain.defence_options.{defence}: {defence}: .* must be"):
        pretrain.plan_run(params_with(data, tmp_path, defence_options={defence: bad}), "mmcl", defence=defence)
    one = tmp_path / "1"
    model = one / "models" / f"mmcl+{defence}" / "model.pt"
    exported = file_sha256(model)
    latest = sorted((one / "ray").glob(f"mmcl+{defence}-*/checkpoint_*/state.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[:100])  # damaged: the rerun resumes from step 20 (epoch 4, batch 2)
    pretrain.train(params_with(data, one, epochs=4, defences=["none", defence], defence_options={defence: options}),
                   "mmcl", defence=defence)
    assert file_sha256(model) == exported
