"""The whole study through `python -m flows.pipeline` in a fresh git+DVC repo on tiny params:
every stage runs through DVC, the report and metrics appear, and a second run finds all up to date."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import load_params
from tests.conftest import REPO, copy_project, tiny_params, write_params

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


STAGES = ("curate", "poison", "pretrain", "clean", "evaluate")


def stage_status(output: str) -> dict:
    return dict(re.findall(r"^\s*(\w+): (ran|up to date) \(", output, re.M))


def tiny_study(repo: Path) -> dict:
    params = tiny_params(repo, [], shard_maxcount=64)
    params["curate"] |= {"out_dir": "data/curated", "staging_dir": "data/staging/curate"}
    params["curate"]["sources"][0] |= {"train_pairs": 160, "eval_per_class": 2}
    params["poison"] = {"count": 16, "trigger": {"patch_size": 0.25}, "cleaning": {"size": 32},
                        "runner": {"kind": "thread", "workers": 2}}
    params["pretrain"] = {"objectives": ["mmcl"], "baselines": ["mmcl"], "model": "vit-tiny", "epochs": 1,
                          "batch_size": 32, "warmup_steps": 1, "checkpoint_every": 100, "threads_per_worker": 1}
    params["clean"] = {"models": ["mmcl", "clean-mmcl"], "defences": ["cleanclip"], "lrs": [1e-3], "epochs": 1, "batch_size": 16,
                       "runner": {"kind": "thread", "workers": 1}}
    params["evaluate"] = {}
    return params


def test_pipeline_end_to_end_then_up_to_date(tmp_path, prefect_api_url):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    for name in ("models", "defences"):
        subprocess.run(["cp", "-r", str(REPO / name), str(repo / name)], check=True)
    write_params(repo / "params.yaml", tiny_study(repo))
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)

    def pipeline():
        proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=1100)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc.stdout

    first = pipeline()
    assert stage_status(first) == dict.fromkeys(STAGES, "ran")
    assert "report: reports/report.md" in first and "| mmcl | cleanclip |" in first
    for path in ("reports/report.md", "data/metrics/frontier.json", "data/metrics/pretrain.json",
                 "data/models/clean/clean-mmcl/cleanclip/sweep.json", "data/plots/frontier.csv"):
        assert (repo / path).is_file(), path
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "up to date" in status, status

    assert stage_status(pipeline()) == dict.fromkeys(STAGES, "up to date")


def test_study_params_file_validates():
    params = load_params(REPO / "params" / "cc3m.yaml")
    assert (params.pretrain.model, params.pretrain.batch_size, params.pretrain.epochs) == ("RN50", 2048, 64)
    assert params.poison.count == 1500 and params.poison.cleaning.size == 100_000


def test_deploy_needs_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "set PREFECT_API_URL to a running Prefect server" in proc.stderr
