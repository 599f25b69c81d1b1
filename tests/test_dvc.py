"""`dvc repro` in a fresh git repo: runs the stage, is a no-op the second time, byte-identical when forced."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_project, tiny_params, write_params

pytestmark = pytest.mark.integration


def sh(cwd, *cmd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def shard_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "data").rglob("*.tar")) if "staging" not in p.parts}


def test_dvc_repro_noop_and_byte_identical(tmp_path, prefect_api_url):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    params = tiny_params(repo, [])
    params["curate"]["out_dir"] = "data/curated"
    params["curate"]["staging_dir"] = "data/staging"
    params["poison"] = {"count": 4, "cleaning": {"size": 10}, "trigger": {"patch_size": 0.25},
                        "runner": {"kind": "thread", "workers": 2}}
    # dvc.yaml's clean matrix reads these lists from params.yaml; this test runs curate and poison only
    params["clean"] = {"models": ["mmcl"], "defences": ["cleanclip"]}
    params["pretrain"] = params["evaluate"] = {}  # dvc.yaml reads every stage's folders from params.yaml
    write_params(repo / "params.yaml", params)
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    sh(repo, "git", "init", "-q", env=env)
    sh(repo, "dvc", "init", "-q", env=env)

    first = sh(repo, "dvc", "repro", "poison", env=env)
    assert "Running stage 'curate'" in first and "Running stage 'poison'" in first
    hashes = shard_hashes(repo)
    # curated: 40 train pairs and 22 eval images in shards of 16; poisoned: train, clean eval, ASR eval, cleaning
    assert len(hashes) == (3 + 2) + (3 + 2 + 2 + 1)
    assert (repo / "dvc.lock").is_file()

    second = sh(repo, "dvc", "repro", "poison", env=env)
    assert "Stage 'curate' didn't change, skipping" in second and "Stage 'poison' didn't change, skipping" in second
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", "curate", "poison", env=env)

    sh(repo, "dvc", "repro", "--force", "curate", "poison", env=env)
    assert shard_hashes(repo) == hashes

    # A poison-only change reruns poison, not curate.
    params["poison"]["count"] = 5
    write_params(repo / "params.yaml", params)
    rerun = sh(repo, "dvc", "repro", "poison", env=env)
    assert "Stage 'curate' didn't change, skipping" in rerun and "Running stage 'poison'" in rerun
    changed = shard_hashes(repo)
    assert {k for k in hashes if changed[k] != hashes[k]} <= {k for k in hashes if k.startswith("data/poisoned")}
    assert changed != hashes

    params["seed"] = 8
    write_params(repo / "params.yaml", params)
    assert "curate" in sh(repo, "dvc", "status", "curate", "poison", env=env)
    assert "Running stage 'curate'" in sh(repo, "dvc", "repro", "poison", env=env)
    changed = shard_hashes(repo)
    assert changed.keys() == hashes.keys() and changed["data/curated/train/shard-000000.tar"] != hashes["data/curated/train/shard-000000.tar"]


def test_stage_rejects_bad_params_before_work(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    params = tiny_params(repo, [])
    params["curate"]["shard_maxcount"] = 0
    write_params(repo / "params.yaml", params)
    proc = subprocess.run([sys.executable, "-m", "flows.curate"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "curate.shard_maxcount: Input should be greater than or equal to 1 (got 0)" in proc.stderr
    assert not (repo / "data").exists()


def test_plots_show_needs_no_network(tmp_path, browser):
    """`dvc plots show` with the project's template: Vega, Vega-Lite and Vega-Embed inline, no script or
    stylesheet from anywhere else, and a real browser draws the chart from the file alone."""
    import re

    from core.offline_plots import write_template

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    sh(tmp_path, "git", "init", "-q", env=env)
    sh(tmp_path, "dvc", "init", "-q", env=env)
    write_template(tmp_path / ".dvc" / "plots.html")
    sh(tmp_path, "dvc", "config", "plots.html_template", "plots.html", env=env)
    (tmp_path / "loss.csv").write_text("step,loss\n1,2.0\n2,1.5\n3,1.2\n")
    sh(tmp_path, "dvc", "plots", "show", "loss.csv", "-x", "step", "-y", "loss", "-o", "out", env=env)
    page = (tmp_path / "out" / "index.html").read_text()
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)  # nothing fetched
    assert "window.vegaEmbed=" in page  # the library, inline
    assert page.index("window.vegaEmbed=") < page.index("vegaEmbed('#loss_csv'")  # defined before the plot calls it
    assert re.search(r'"loss": ?"?1\.2', page)  # the data, in the page
    browser.text_when((tmp_path / "out" / "index.html").as_uri(), "loss.csv", "step")  # the chart's title and axis
    assert len(browser.find_elements(browser.by.CSS_SELECTOR, "svg.marks")) == 1  # Vega drew it
