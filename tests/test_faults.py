"""Fault injection, one kind per test: non-finite and boolean settings, collapsed predictions, a
stage killed at each phase of curate, processes orphaned by kill -9, a full disk, damaged shards and
checkpoints, a stage started twice, errors that must not be retried."""
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from prefect.states import Failed

from flows.common import _no_space, worth_retrying
from tasks import curate, poison
from tasks.clean import _better
from tasks.config import ConfigError, parse_params
from core.checkpoint import CheckpointError, load_model
from core.frontier import frontier
from core.data.loader import BatchStream
from core.locks import Busy, exclusive
from core.metrics import zero_shot_metrics
from core.model import RunStopped, build_model, model_config
from core.data.shards import (
    ShardError, ShardSink, atomic_write_json, check_shards, decode_sample_image, file_sha256, replacing,
)
from tests.conftest import (
    REPO, copy_project, curated_tiny, manifest_row, png_bytes, random_image, tiny_params, write_params, write_shards,
)


# -- 1. settings that are not numbers, and runs that are not results ------------------------------

@pytest.mark.parametrize("section, key, value, where", [
    ("clean", "lrs", [float("inf")], "clean.lrs.0: Input should be a finite number"),
    ("pretrain", "lr", float("inf"), "pretrain.lr: Input should be a finite number"),
    ("pretrain", "weight_decay", float("nan"), "pretrain.weight_decay: Input should be a finite number"),
    ("pretrain", "epochs", True, "pretrain.epochs: Input should be a valid integer (got True)"),
    ("pretrain", "grad_clip", float("-inf"), "pretrain.grad_clip: Input should be a finite number"),
    ("clean", "defence_options", {"cleanclip": {"ssl": True}}, "clean.defence_options.cleanclip.ssl: Value error, got a boolean"),
    ("poison", "count", False, "poison.count: Input should be a valid integer (got False)"),
    ("curate", "shard_maxcount", 2.5, "curate.shard_maxcount: Input should be a valid integer (got 2.5)"),
])
def test_non_finite_and_boolean_settings_are_refused_with_their_key(section, key, value, where):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section][key] = value
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert where in str(err.value)


def test_collapsed_predictions_are_flagged_and_never_chosen():
    labels = np.repeat(np.arange(10), 5)
    healthy = {"labels": labels, "top5": np.stack([labels] + [(labels + i) % 10 for i in range(1, 5)], axis=1)}
    one_class = {"labels": labels, "top5": np.tile(np.arange(5), (50, 1))}  # class 0 for everything
    assert not zero_shot_metrics(healthy, [str(c) for c in range(10)])["collapsed"]
    collapsed = zero_shot_metrics(one_class, [str(c) for c in range(10)])
    assert collapsed["collapsed"] and collapsed["top_class_share"] == 1.0 and collapsed["top1"] == 0.1

    point = {"accuracy": 0.6, "asr": 0.3, "clean_target_rate": 0.1, "lr": 1e-3, "epoch": 1}
    dead = {"accuracy": 0.1, "asr": 0.0, "clean_target_rate": 0.0, "lr": 1.0, "epoch": 1, "collapsed": True}
    cell = frontier([point, dead], {"accuracy": 0.1, "asr": 1.0, "clean_target_rate": 0.1})
    assert cell["n_collapsed"] == 1 and cell["best_accuracy_at_asr"]["0.05"] is None  # ASR 0 of the dead model is no result
    assert cell["lowest_asr_within_accuracy_drop"]["0.01"]["asr"] == 0.3
    assert _better(point, dead) and not _better(dead, point)


def test_errors_that_a_retry_cannot_fix_are_not_retried():
    assert not worth_retrying(None, None, Failed(data=ConfigError("bad")))
    assert not worth_retrying(None, None, Failed(data=RunStopped("loss became nan")))
    assert not worth_retrying(None, None, Failed(data=ShardError("cut short")))
    assert not worth_retrying(None, None, Failed(data=OSError(errno.ENOSPC, "No space left on device")))
    assert worth_retrying(None, None, Failed(data=ConnectionResetError(errno.ECONNRESET, "reset")))
    assert worth_retrying(None, None, Failed(data=RuntimeError("worker lost")))


# -- 4. a full disk ---------------------------------------------------------------------------------

def test_no_space_names_the_folder_and_its_key(tmp_path):
    folders = {"curate.out_dir": tmp_path / "curated", "curate.staging_dir": tmp_path / "staging"}
    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "staging" / "abc" / "p000001-000000.tar.tmp"))
    line = _no_space(err, folders)
    assert line.startswith(f"no space left on device for curate.staging_dir ({tmp_path / 'staging'}): ")
    assert "MiB free there (writing " in line and "point curate.staging_dir elsewhere" in line
    both = _no_space(OSError(errno.ENOSPC, "No space left on device"), folders)  # no file named: the folders on the fullest disk
    assert both.startswith(f"no space left on device for curate.out_dir ({tmp_path / 'curated'}) and curate.staging_dir (")


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(OSError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with ShardSink(tmp_path / "shard", 10) as sink:
            sink.write({"__key__": "a", "txt": b"x"}, manifest_row("a"))
            raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (needs root, as on the CI machine); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.integration
def test_full_disk_names_the_key_is_not_retried_and_keeps_the_old_output(small_disk, tmp_path, prefect_api_url):
    raw = tiny_params(tmp_path, [], out_dir=str(small_disk / "curated"), staging_dir=str(small_disk / "staging"),
                      runner={"kind": "process", "workers": 2})
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    cmd = [sys.executable, "-m", "flows.curate", "--params", str(tmp_path / "params.yaml")]
    write_params(tmp_path / "params.yaml", raw)
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_bytes(small_disk / "curated")

    raw["curate"]["sources"][0] |= {"train_pairs": 3000}  # ~4 MiB of PNGs: more than the disk holds
    write_params(tmp_path / "params.yaml", raw)
    full = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1
    error = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, full.stderr[-3000:]
    assert error[0].startswith(f"error: no space left on device for curate.out_dir ({small_disk / 'curated'}) and "
                               f"curate.staging_dir ({small_disk / 'staging'}): "), error
    assert "Retrying" not in full.stdout + full.stderr and "Traceback" not in full.stderr
    assert not [p for p in small_disk.rglob("*.tmp")]  # no temporary file left behind
    assert tree_bytes(small_disk / "curated") == before  # the previous output is intact


# -- 2. curate killed at each phase gives the uninterrupted output byte for byte --------------------

def tree_bytes(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "stats.json":  # wall-clock timings are the one thing a rerun may change
                data = json.dumps(json.loads(data) | {"throughput": None}).encode()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def duplicate_rows_params(tmp_path: Path, out: str) -> dict:
    """The issue's case: a CSV whose rows 30-34 repeat rows 0-4, partitions of 10 rows; curated into `out`."""
    images = tmp_path / "src"
    if not images.is_dir():
        images.mkdir()
        rows = []
        for i in range(30):
            (images / f"{i}.png").write_bytes(png_bytes(random_image(i)))
            rows.append(f"{i}.png,a photo of thing number {i}")
        (images / "pairs.csv").write_text("image,caption\n" + "\n".join(rows + rows[:5]) + "\n")
    raw = tiny_params(tmp_path / out, [{"kind": "csv", "name": "web", "path": str(images / "pairs.csv")}],
                      shard_maxcount=10)
    raw["curate"]["sources"] = raw["curate"]["sources"][1:]
    return raw


def _kill_during_partition(params, parts):
    curate.process_partition(params, parts[0])
    junk = curate.staging_dir(params) / "p000001-000000.tar.tmp"  # what a kill mid-write leaves
    junk.write_bytes(b"half a tar")


def _kill_during_finalize(params, parts, monkeypatch):
    results = [curate.process_partition(params, p) for p in parts]
    real, calls = curate.rewrite_shard, []

    def dies(*args):
        calls.append(1)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(curate, "rewrite_shard", dies)
    with pytest.raises(KeyboardInterrupt):
        curate.finalize(params, results)
    monkeypatch.setattr(curate, "rewrite_shard", real)
    assert calls, "the duplicates were not met in finalize"


def _kill_after(phase):
    def run(params, parts, monkeypatch):
        results = [curate.process_partition(params, p) for p in parts]
        partial = curate.finalize(params, results)
        if phase == "validation":
            curate.validate_curated(params, partial)
        if phase == "publish":  # between the two renames of swap_into_place
            params.curate.out_dir.rename(f"{params.curate.out_dir}.old")
    return run


@pytest.mark.parametrize("phase", ["partition", "finalize", "after-finalize", "validation", "publish"])
def test_curate_killed_at_each_phase_resumes_to_the_same_bytes(phase, tmp_path, monkeypatch):
    reference = parse_params(duplicate_rows_params(tmp_path, "ref"))
    stats = curate.run_sequential(reference)
    assert stats["total"]["written"] == 30 and stats["total"]["quarantined"] == {"duplicate": 5}
    expected = tree_bytes(reference.curate.out_dir)

    params = parse_params(duplicate_rows_params(tmp_path, "run"))
    if phase == "publish":
        curate.run_sequential(params)  # an older output exists while the next run publishes
    parts = curate.plan_partitions(params)
    {"partition": lambda: _kill_during_partition(params, parts),
     "finalize": lambda: _kill_during_finalize(params, parts, monkeypatch),
     "after-finalize": lambda: _kill_after("finalize")(params, parts, monkeypatch),
     "validation": lambda: _kill_after("validation")(params, parts, monkeypatch),
     "publish": lambda: _kill_after("publish")(params, parts, monkeypatch)}[phase]()
    again = curate.run_sequential(params)
    assert again["total"]["written"] == 30 and again["total"]["quarantined"] == {"duplicate": 5}
    assert tree_bytes(params.curate.out_dir) == expected
    sizes = json.loads((params.curate.out_dir / "train" / "sizes.json").read_text())
    with_members = {name: len(tarfile.open(params.curate.out_dir / "train" / name).getnames()) // 3 for name in sizes}
    assert sizes == with_members  # every count is what the tar holds
    assert not Path(f"{params.curate.out_dir}.old").exists() and not Path(f"{params.curate.out_dir}.partial").exists()


@pytest.mark.integration
def test_poison_killed_midway_resumes_to_the_same_bytes(tmp_path, prefect_api_url):
    """A real SIGKILL while poison writes its shards; the rerun gives the uninterrupted run's output."""
    raw = curated_tiny(tmp_path, train_pairs=2000, eval_per_class=4, shard_maxcount=100)

    def poisoned_into(name: str) -> dict:
        return json.loads(json.dumps(raw)) | {"poison": {
            "in_dir": str(tmp_path / "data" / "curated"), "out_dir": str(tmp_path / name), "count": 100,
            "trigger": {"patch_size": 0.25}, "cleaning": {"size": 64}, "runner": {"kind": "process", "workers": 2}}}

    poison.run_sequential(parse_params(poisoned_into("reference")))
    write_params(tmp_path / "params.yaml", poisoned_into("poisoned"))
    cmd = [sys.executable, "-m", "flows.poison", "--params", str(tmp_path / "params.yaml")]
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list((tmp_path / "poisoned.partial").rglob("*.tar")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "poison finished before the kill"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    outputs = [{k: v for k, v in tree_bytes(tmp_path / name).items() if k != "validation.json"}  # GX stamps its run
               for name in ("reference", "poisoned")]
    assert outputs[0] == outputs[1] and len(outputs[0]) > 10


# -- 3 and 7. kill -9 leaves no process behind; a stage started twice is refused --------------------

@pytest.mark.integration
def test_kill_9_leaves_no_process_and_a_second_run_is_refused(tmp_path):
    raw = tiny_params(tmp_path, [], runner={"kind": "process", "workers": 2})
    raw["curate"]["sources"][0] |= {"train_pairs": 6000}
    write_params(tmp_path / "params.yaml", raw)
    cmd = [sys.executable, "-m", "flows.curate", "--params", str(tmp_path / "params.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # it starts its own server: reaped too
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main = psutil.Process(first.pid)
    deadline = time.time() + 180
    while not list(Path(raw["curate"]["staging_dir"]).glob("*/p*-*.tar.tmp")) and time.time() < deadline:
        time.sleep(0.2)  # until the pool workers write shards
    started = main.children(recursive=True)
    assert len([p for p in started if "flows.reaper" not in " ".join(p.cmdline())]) >= 3  # 2 workers + the server

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"is in use by pid {first.pid} (" in second.stderr and "curate.out_dir" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGKILL)
    first.wait()
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]  # the lock died with its holder; the run resumes


@pytest.mark.parametrize("command", ["curate", "pipeline"])
def test_sigterm_stops_the_command_and_everything_it_started(command, tmp_path):
    """SIGTERM to a stage command (or to the pipeline, whose `dvc repro` runs the stage) is passed on to the
    processes it started, and it exits within seconds, not when its work is done; a rerun resumes."""
    raw = tiny_params(tmp_path, [], runner={"kind": "process", "workers": 2})
    raw["curate"]["sources"][0] |= {"train_pairs": 6000}
    raw |= {"poison": {"count": 8}, "pretrain": {}, "clean": {}, "evaluate": {}}  # dvc.yaml reads every section
    params = write_params(tmp_path / ("params.yaml" if command == "pipeline" else "curate.yaml"), raw)
    if command == "pipeline":  # a DVC project of its own whose curate stage is the one above
        copy_project(tmp_path)
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    cmd = [sys.executable, "-m", f"flows.{command}"] + (["--params", str(params)] if command == "curate" else [])
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cwd = tmp_path if command == "pipeline" else REPO
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = Path(raw["curate"]["staging_dir"])
    staging = staging if staging.is_absolute() else cwd / staging
    deadline = time.time() + 300
    while not list(staging.glob("*/p*-*.tar.tmp")) and time.time() < deadline:
        time.sleep(0.2)  # until the pool workers write shards
    started = [p for p in psutil.Process(proc.pid).children(recursive=True) if "flows.reaper" not in " ".join(p.cmdline())]
    assert len(started) >= 3
    stopped = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert time.time() - stopped < 60
    if command == "curate":
        rerun = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]


def test_two_keys_naming_one_folder_take_one_lock(tmp_path):
    with exclusive({"evaluate.metrics_dir": tmp_path / "m", "evaluate.plots_dir": tmp_path / "m"}):
        with pytest.raises(Busy, match=rf"evaluate.report_dir: {tmp_path / 'm'} is in use by pid {os.getpid()} "):
            with exclusive({"evaluate.report_dir": tmp_path / "m"}):
                pass


def test_a_worker_error_that_a_retry_cannot_fix_is_raised_as_itself():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from tasks.pretrain import _cause

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RayTaskError("train_fn", "traceback", full)
    assert _cause(WorkerGroupError("rank 0 failed", {0: wrapped})) is full
    lost = WorkerGroupError("rank 1 failed", {1: RayTaskError("train_fn", "traceback", ConnectionError("node lost"))})
    assert _cause(lost) is lost  # a lost node: Ray's own error, which Prefect may retry


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from core.locks import exclusive\n"
        f"with exclusive({{'clean.out_dir': Path({str(folder)!r})}}):\n"
        "    print('held', flush=True); time.sleep(120)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Busy, match=rf"clean.out_dir: {folder} is in use by pid {holder.pid} \("):
        with exclusive({"clean.out_dir": folder}):
            pass
    holder.kill()
    holder.wait()
    with exclusive({"clean.out_dir": folder}):
        pass


# -- 6. damaged shards: checked before training, named by tar and key -------------------------------

def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def member_offsets(tar_path: Path) -> dict:
    with tarfile.open(tar_path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def test_damaged_shards_are_named_before_training(tmp_path):
    good = tmp_path / "good"
    write_shards(good)
    digest = check_shards(good, "pretrain.data_dir")

    def damaged(name, damage):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        with pytest.raises(ShardError) as err:
            check_shards(folder, "pretrain.data_dir")
        return str(err.value)

    tar1 = "shard-000001.tar"
    msg = damaged("missing", lambda f: (f / tar1).unlink())
    assert msg == f"pretrain.data_dir: {tmp_path / 'missing' / tar1} is missing (sizes.json lists {tar1} with 4 samples)"
    mid = member_offsets(good / tar1)["s006.png"]
    msg = damaged("mid-sample", lambda f: cut(f / tar1, mid[1] + mid[2] // 2))
    assert msg.startswith(f"pretrain.data_dir: {tmp_path / 'mid-sample' / tar1} is damaged at sample 's006'")
    boundary = member_offsets(good / tar1)["s007.png"][0]  # the last sample's first header: cut just before it
    msg = damaged("boundary", lambda f: cut(f / tar1, boundary))
    assert f"{tar1} is damaged at sample 's006'" in msg and "end-of-archive marker" in msg
    msg = damaged("count", lambda f: atomic_write_json(f / "sizes.json", {"shard-000000.tar": 4, tar1: 5}))
    assert f"{tar1} holds 4 samples, its manifest lists 4 and sizes.json counts 5" in msg

    def drop_image(folder):
        tar = folder / tar1
        with tarfile.open(tar) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name != "s005.png"]
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as dst:
            for m, data in members:
                dst.addfile(m, io.BytesIO(data))
    assert damaged("no-image", drop_image).endswith(f"{tar1}: sample 's005' has no image")

    changed = tmp_path / "changed"  # same keys, counts and manifests; one caption's bytes differ
    shutil.copytree(good, changed)
    with tarfile.open(good / tar1) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(changed / tar1, "w", format=tarfile.GNU_FORMAT) as dst:
        for m, data in members:
            data = b"caption of s0O4" if m.name == "s004.txt" else data
            dst.addfile(m, io.BytesIO(data))
    assert check_shards(changed, "pretrain.data_dir") != digest  # a run on other bytes is another run


def test_loader_names_the_shards_that_ran_out_and_a_sample_without_image(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder)
    atomic_write_json(folder / "sizes.json", {"shard-000000.tar": 4, "shard-000001.tar": 8})  # promises 12
    stream = BatchStream(folder, 4, 0, 1, 0, lambda im: torch.zeros(3, 8, 8),
                         lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), shuffle_buffer=2)
    with pytest.raises(ShardError, match=rf"{folder}: the shards ran out in epoch 0: they hold fewer than the 12 samples"):
        list(stream.epoch(0))
    with pytest.raises(ShardError, match=r"x.tar: sample 's1' has no image \(members: \['txt'\]\)"):
        decode_sample_image({"__key__": "s1", "__url__": "x.tar", "txt": b"hi"})


# -- 5. damaged or replaced exported models ---------------------------------------------------------

def test_exported_model_is_checked_against_its_sha256(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model("vit-tiny", "mmcl")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    atomic_write_json(tmp_path / "model_config.json", {"model": "vit-tiny", "objective": "mmcl", "open_clip_config":
                                                       model_config("vit-tiny"), "sha256": {"model.pt": file_sha256(path)}})
    load_model(path)
    torch.manual_seed(1)
    torch.save(build_model("vit-tiny", "mmcl")[0].state_dict(), path)  # a valid file, but not the one exported
    with pytest.raises(CheckpointError, match=rf"{path} is not the file that was exported: its sha256 differs"):
        load_model(path)
    state = model.state_dict()
    state["logit_scale"] = torch.tensor(float("nan"))
    torch.save(state, path)
    config = json.loads((tmp_path / "model_config.json").read_text())
    atomic_write_json(tmp_path / "model_config.json", config | {"sha256": {"model.pt": file_sha256(path)}})
    with pytest.raises(CheckpointError, match=r"holds NaN or inf in 1 of \d+ tensors \(e.g. \['logit_scale'\]\): the run"):
        load_model(path)
    cut(path, 5000)
    with pytest.raises(CheckpointError, match=rf"^{path} is not a readable torch checkpoint \(truncated"):
        load_model(path)
