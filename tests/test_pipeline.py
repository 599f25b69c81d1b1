"""The whole study through `python -m flows.pipeline` in fresh git+DVC repos on tiny params: every stage
runs through DVC, the report and metrics appear, a second run finds all up to date, and a run killed in
pretrain resumes to the same metrics."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.config import load_params
from tests.conftest import REPO, complete_checkpoints, copy_project, tiny_params, write_params

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


STAGES = ("curate", "optimise-trigger", "poison", "pretrain", "detect", "clean", "evaluate")
MODELS = ("mmcl", "mmcl+safeclip", "control-mmcl")
DEFENCES = ("cleanclip", "par")


def stage_status(output: str) -> dict:
    return dict(re.findall(r"^\s*([\w-]+): (ran|up to date) \(", output, re.M))


def tiny_study(repo: Path) -> dict:
    params = tiny_params(repo, [], shard_maxcount=64)
    params["curate"] |= {"out_dir": "data/curated", "staging_dir": "data/staging/curate"}
    params["curate"]["sources"][0] |= {"train_pairs": 160, "eval_per_class": 2}
    params["optimise_trigger"] = {"steps": 20, "images": 64, "batch_size": 16}
    params["poison"] = {"count": 16, "trigger": {"name": "optimised", "patch_size": 0.25}, "cleaning": {"size": 32},
                        "runner": {"kind": "thread", "workers": 2}}
    params["pretrain"] = {"objectives": ["mmcl"], "controls": ["mmcl"], "defences": ["none", "safeclip"],
                          "model": "vit-tiny", "epochs": 3, "batch_size": 32, "warmup_steps": 1, "checkpoint_every": 2,
                          "threads_per_worker": 1, "concurrent_runs": 2}
    params["detect"] = {}
    params["clean"] = {"models": list(MODELS), "defences": list(DEFENCES), "lrs": [1e-3], "epochs": 1, "batch_size": 16,
                       "runner": {"kind": "thread", "workers": 1}, "threads_per_run": 1}
    params["evaluate"] = {}
    return params


def new_repo(path: Path) -> Path:
    path.mkdir()
    copy_project(path)
    write_params(path / "params.yaml", tiny_study(path))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True)
    return path


def pipeline_cmd(repo: Path, env: dict, **popen):
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def run_pipeline(repo: Path, env: dict) -> str:
    proc = pipeline_cmd(repo, env)
    out, _ = proc.communicate(timeout=1100)
    assert proc.returncode == 0, out[-8000:]
    return out


def metrics_of(repo: Path) -> dict:
    return {name: (repo / "data" / "metrics" / name).read_text() for name in ("pretrain.json", "frontier.json")}


@pytest.fixture(scope="module")
def env(prefect_api_url):
    return dict(os.environ, PREFECT_API_URL=prefect_api_url,
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The tiny study run once, uninterrupted: (repo, the pipeline's output)."""
    repo = new_repo(tmp_path_factory.mktemp("reference") / "repo")
    return repo, run_pipeline(repo, env)


def test_pipeline_end_to_end_then_up_to_date(reference, env):
    repo, first = reference
    assert stage_status(first) == dict.fromkeys(STAGES, "ran")
    assert "report: reports/report.md" in first and "| mmcl | cleanclip |" in first and "| mmcl+safeclip | par |" in first
    for path in ("reports/report.md", "data/metrics/frontier.json", "data/metrics/pretrain.json",
                 "data/models/cleaned/control-mmcl/cleanclip/sweep.json", "data/plots/frontier.csv",
                 "data/models/pretrain/mmcl+safeclip/model.pt", "data/detect/mmcl+safeclip/scores.parquet"):
        assert (repo / path).is_file(), path
    detection = json.loads((repo / "data" / "metrics" / "detection.json").read_text())
    assert set(detection) == {"mmcl", "mmcl+safeclip"}  # the poisoned models, not the control
    assert set(detection["mmcl"]["detectors"]) == {"similarity", "density", "spectral"}
    assert detection["mmcl"]["detectors"]["spectral"]["k"] == 16 and detection["mmcl"]["pairs"] == 160
    report = (repo / "reports" / "report.md").read_text()
    assert "## Poisoned-pair detection" in report and "| mmcl+safeclip | density |" in report
    # the optimised patch went through DVC to the poisons; its surrogate was pretrain's control run, reused there
    trigger = json.loads((repo / "data" / "trigger" / "trigger.json").read_text())
    control = json.loads((repo / "data" / "models" / "pretrain" / "control-mmcl" / "metrics.json").read_text())
    assert trigger["optimised"] and trigger["surrogate"]["run_id"] == control["run_id"]
    assert json.loads((repo / "data" / "poisoned" / "stats.json").read_text())["trigger"]["name"] == "optimised"
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "up to date" in status, status

    # How the work runs is no reason to rerun it: workers, runners, threads, logging, batch sizes of inference
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["curate"]["runner"]["workers"] = params["poison"]["runner"]["workers"] = 3
    params["pretrain"] |= {"log_every": 1, "checkpoint_every": 7, "concurrent_runs": 1, "threads_per_worker": 2}
    params["clean"] |= {"runner": {"kind": "process", "workers": 2}, "eval_batch_size": 7}
    params["evaluate"]["batch_size"] = 9
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "Data and pipelines are up to date" in status, status
    params["clean"]["defences"] = [*DEFENCES, "mmcl"]  # a new cell of the matrix: the finished cells stay
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "clean@mmcl-mmcl:" in status and "clean@mmcl-cleanclip:" not in status, status
    params["poison"]["target"] = "heart"  # what the poison stage computes: it and everything after it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "poison:" in status and "optimise-trigger:" in status and "curate:" not in status, status
    (repo / "params.yaml").write_text(original)

    assert stage_status(run_pipeline(repo, env)) == dict.fromkeys(STAGES, "up to date")


@pytest.mark.slow  # 3 min; test_pretrain's and test_faults' kill tests cover resume in the default suite
def test_killed_in_pretrain_resumes_to_the_same_metrics(reference, tmp_path, env):
    """SIGKILL to the whole pipeline (Prefect, DVC, Ray) once pretrain has a checkpoint; the rerun resumes
    the runs from their checkpoints and ends with the uninterrupted run's metrics, byte for byte (CPU).
    Starts from the reference's curated and poisoned data (DVC finds them up to date), nothing after."""
    repo = tmp_path / "repo"
    after_poison = {".dvc/cache", "data/models", "data/staging/pretrain", "data/metrics", "data/plots", "reports"}
    shutil.copytree(reference[0], repo, ignore=lambda d, names: [
        n for n in names if (Path(d) / n).relative_to(reference[0]).as_posix() in after_poison])
    proc = pipeline_cmd(repo, env, start_new_session=True)
    storage = repo / "data" / "staging" / "pretrain"
    deadline = time.time() + 600
    while not complete_checkpoints(storage) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    started = psutil.Process(proc.pid).children(recursive=True)  # DVC, the stage, Ray, the Prefect server
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    _, alive = psutil.wait_procs(started, timeout=30)  # Ray's own sessions too: the watchdogs kill them
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    steps = complete_checkpoints(storage)
    assert steps and min(steps) < 15, "pretrain finished before the kill"
    assert not (repo / "data" / "metrics" / "pretrain.json").exists()

    rerun = run_pipeline(repo, env)
    assert "resumed from checkpoint at step" in rerun
    assert stage_status(rerun) == {"curate": "up to date", "optimise-trigger": "up to date", "poison": "up to date", "pretrain": "ran",
                                   "detect": "ran", "clean": "ran", "evaluate": "ran"}
    assert metrics_of(repo) == metrics_of(reference[0])


def test_dvc_experiment_varies_one_param(reference, env):
    """`dvc exp run -S` reruns only the stages that read the changed key; `dvc exp show` lists it."""
    repo, _ = reference
    git = env | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "tiny study"]):
        subprocess.run(cmd, cwd=repo, env=git, check=True)
    proc = subprocess.run(["dvc", "exp", "run", "-n", "two-epochs", "-S", "clean.epochs=2"], cwd=repo, env=git,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ran = set(re.findall(r"Running stage '([\w@+-]+)'", proc.stdout))
    assert ran == {f"clean@{m}-{d}" for m in MODELS for d in DEFENCES} | {"evaluate"}, ran
    shown = subprocess.run(["dvc", "exp", "show", "--csv"], cwd=repo, env=git, capture_output=True, text=True).stdout
    rows = {line.split(",")[0]: line for line in shown.splitlines()}
    assert "two-epochs" in rows and "clean.epochs" in shown.splitlines()[0]


def test_study_params_file_validates():
    params = load_params(REPO / "params" / "cc3m.yaml")
    assert (params.pretrain.model, params.pretrain.batch_size, params.pretrain.epochs) == ("RN50", 2048, 64)
    assert params.poison.count == 1500 and params.poison.cleaning.size == 100_000


def test_deploy_needs_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "set PREFECT_API_URL to a running Prefect server" in proc.stderr
