"""The real-resolution path: params/smoke-224.yaml through `python -m flows.pipeline` (Prefect + DVC + Ray
Train) at 224 px with open_clip's RN50, then ViT-B-32 on the same curated and poisoned data: shapes,
memory, preprocess, the 16/224 trigger, checkpoint export and reload. Nothing is learnt (2-4 steps)."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from core.checkpoint import load_model
from tasks.config import STAGES
from tests.conftest import REPO, copy_project

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]


def pipeline(repo: Path, env: dict, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=repo, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=2000)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc.stdout


def ran(output: str) -> dict:
    return {line.split(":")[0].strip(): "ran" in line.split(":")[1] for line in output.splitlines()
            if line.strip().split(":")[0] in STAGES and "(" in line}


def check_model(repo: Path, name: str, arch: str, embed_dim: int) -> None:
    out = repo / "data" / "models" / "pretrain" / name
    config = json.loads((out / "model_config.json").read_text())
    assert config["model"] == arch and config["open_clip_config"]["vision_cfg"]["image_size"] == 224
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4, metrics
    model, preprocess, _ = load_model(out / "model.pt")  # reload checks the sha256 and the config
    with tarfile.open(repo / "data" / "poisoned" / "eval" / "asr" / "shard-000000.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = Image.open(io.BytesIO(tar.extractfile(jpg).read()))
    assert image.size == (224, 224)
    with torch.no_grad():
        assert model.encode_image(preprocess(image)[None]).shape == (1, embed_dim)


def test_rn50_then_vit_b_32_at_224_px_through_the_pipeline(tmp_path, prefect_api_url):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    (repo / "params").mkdir()
    (repo / "params" / "smoke-224.yaml").write_bytes((REPO / "params" / "smoke-224.yaml").read_bytes())
    env = dict(os.environ, PREFECT_API_URL=prefect_api_url,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # links instead of copies between DVC's cache and the workspace, as the README advises for GB checkpoints
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "cache.type", "reflink,hardlink,copy"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)

    first = pipeline(repo, env, "--params", "params/smoke-224.yaml")
    assert ran(first) == dict.fromkeys(STAGES, True), first[-3000:]
    manifest = pq.read_table(repo / "data" / "poisoned" / "poison_manifest.parquet").to_pylist()
    assert len(manifest) == 4 and {(r["x1"] - r["x0"], r["y1"] - r["y0"]) for r in manifest} == {(16, 16)}
    for name in ("mmcl", "mmcl_ssl"):
        check_model(repo, name, "RN50", 1024)
    sweep = json.loads((repo / "data" / "models" / "cleaned" / "mmcl_ssl" / "cleanclip" / "sweep.json").read_text())
    assert sweep["lrs"] == [1e-4] and sweep["pretrained"]["epoch"] == 0 and [p["epoch"] for p in sweep["points"]] == [1]
    metrics = json.loads((repo / "data" / "metrics" / "pretrain.json").read_text())
    assert set(metrics) == {"mmcl", "mmcl_ssl"} and all(0 <= m["asr"] <= 1 for m in metrics.values())

    # ViT-B-32 for the cleaned objective only, the RN50 runs' checkpoints dropped: the test's disk peak stays
    # near 4 GB (a ViT-B-32 checkpoint with its Adam state is 1.8 GB)
    shutil.rmtree(repo / "data" / "staging")  # make clean-staging
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"].update(model="ViT-B-32", objectives=["mmcl_ssl"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = pipeline(repo, env)
    # optimise-trigger reads pretrain's recipe (its surrogate's): it reruns, writes the same trigger.json (the
    # trigger is not `optimised`), and poison stays up to date
    assert ran(second) == {"curate": False, "optimise-trigger": True, "poison": False, "pretrain": True, "detect": True,
                           "clean": True, "evaluate": True}
    check_model(repo, "mmcl_ssl", "ViT-B-32", 512)
    assert not (repo / "data" / "models" / "pretrain" / "mmcl").exists()
