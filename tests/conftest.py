import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

for var, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}.items():
    os.environ.setdefault(var, value)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_api_url():
    """A real Prefect API (the test harness's temporary server) shared by the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def random_image(seed: int, size=(48, 40), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def write_tar(path: Path, samples: list[dict], truncate_last_at: int | None = None) -> None:
    """A webdataset tar; optionally cut inside the last sample's image bytes (a truncated member)."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            last_start = tar.fileobj.tell()
            for ext, data in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if truncate_last_at is not None:  # cut inside the first member's data of the last sample
        path.write_bytes(path.read_bytes()[: last_start + 512 + truncate_last_at])


@pytest.fixture
def mixed_sources(tmp_path) -> dict:
    """A CSV, a webdataset tar and an image folder, each with known good and bad samples."""
    root = tmp_path / "sources"
    img_dir = root / "csv_images"
    img_dir.mkdir(parents=True)
    good = {
        "rgb.png": png_bytes(random_image(1)),
        "photo.jpg": png_bytes(random_image(2), "JPEG"),
        "palette.png": png_bytes(random_image(3).convert("P")),
        "alpha.png": png_bytes(random_image(4).convert("RGBA")),
        "gray16.png": png_bytes(Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30)),
        "cmyk.jpg": png_bytes(random_image(5).convert("CMYK"), "JPEG"),
    }
    for name, data in good.items():
        (img_dir / name).write_bytes(data)
    (img_dir / "not_an_image.png").write_bytes(b"this is plain text, not a PNG")
    (img_dir / "tiny.png").write_bytes(png_bytes(random_image(6, (4, 4))))
    (img_dir / "bomb.png").write_bytes(png_bytes(random_image(7, (400, 400))))
    (img_dir / "empty_caption.png").write_bytes(png_bytes(random_image(8)))
    rows = [("image", "caption")] + [(f"csv_images/{n}", f"a picture called {n}") for n in good]
    rows += [
        ("csv_images/missing.png", "the file is not there"),
        ("csv_images/not_an_image.png", "text pretending to be an image"),
        ("csv_images/tiny.png", "a tiny image"),
        ("csv_images/bomb.png", "a very large image"),
        ("csv_images/empty_caption.png", "   "),
        ("csv_images/rgb.png", "a picture called rgb.png"),  # exact duplicate of row 0
    ]
    csv_path = root / "pairs.csv"
    csv_path.write_text("\n".join(f"{a}\t{b}" for a, b in rows) + "\n")

    tar_path = root / "shards" / "00000.tar"
    tar_path.parent.mkdir()
    samples = [{"__key__": f"00000000{i}", "jpg": png_bytes(random_image(20 + i), "JPEG"),
                "txt": f"web caption number {i}".encode(), "json": b"{}"} for i in range(4)]
    write_tar(tar_path, samples, truncate_last_at=100)

    folder = root / "folder"
    for ci, cls in enumerate(["cat", "dog_house"]):
        (folder / cls).mkdir(parents=True)
        for j in range(2):
            (folder / cls / f"{j}.png").write_bytes(png_bytes(random_image(40 + 2 * ci + j)))
    return {
        "csv": {"kind": "csv", "name": "mycsv", "path": str(csv_path), "sep": "\t"},
        "webdataset": {"kind": "webdataset", "name": "web", "urls": str(root / "shards" / "{00000..00000}.tar")},
        "image_folder": {"kind": "image_folder", "name": "folder", "root": str(folder)},
        "expected_quarantine": {
            "mycsv_train_000000006": "missing_file", "mycsv_train_000000007": "undecodable_image",
            "mycsv_train_000000008": "too_small", "mycsv_train_000000009": "decompression_bomb",
            "mycsv_train_000000010": "empty_caption", "mycsv_train_000000011": "duplicate",
            "web_00000_000000003": "truncated_tar_member",
        },
        "expected_good": [f"mycsv_train_{i:09d}" for i in range(6)] + [f"web_00000_00000000{i}" for i in range(3)],
    }


def tiny_params(tmp_path: Path, sources: list[dict], **curate) -> dict:
    """Small, fast params for a test, writing under tmp_path."""
    gen = {"kind": "generated", "name": "gen", "train_pairs": 40, "eval_per_class": 2}
    return {
        "seed": 7,
        "curate": {
            "out_dir": str(tmp_path / "data" / "curated"),
            "staging_dir": str(tmp_path / "data" / "staging"),
            "shard_maxcount": 16,
            "max_image_pixels": 100_000,
            "runner": {"kind": "thread", "workers": 2},
            "sources": [gen] + sources,
        } | curate,
    }


def curated_tiny(root: Path, train_pairs: int, eval_per_class: int, shard_maxcount: int) -> dict:
    """Curate a tiny generated corpus under root (no orchestration); returns its raw params."""
    from tasks import curate
    from tasks.config import parse_params

    raw = tiny_params(root, [], shard_maxcount=shard_maxcount)
    raw["curate"]["sources"][0] |= {"train_pairs": train_pairs, "eval_per_class": eval_per_class}
    curate.run_sequential(parse_params(raw))
    return raw


def poisoned_tiny(root: Path, train_pairs: int) -> dict:
    """A tiny corpus curated (curated_tiny: 2 eval images per class, shards of 64) and poisoned under root:
    8 poisons, a cleaning subset of 48 pairs; returns its raw params."""
    from tasks import poison
    from tasks.config import parse_params

    raw = curated_tiny(root, train_pairs=train_pairs, eval_per_class=2, shard_maxcount=64)
    raw["poison"] = {"in_dir": str(root / "data" / "curated"), "out_dir": str(root / "data" / "poisoned"), "count": 8,
                     "trigger": {"patch_size": 0.25}, "cleaning": {"size": 48}}
    poison.run_sequential(parse_params(raw))
    return raw


def pretrain_params(data: tuple[Path, dict], tmp_path: Path, **pretrain_cfg):
    """Params to pretrain on data ((root, raw params) of curated_tiny) with a tiny ViT, writing under tmp_path."""
    from tasks.config import parse_params

    root, raw = data
    raw = json.loads(json.dumps(raw))
    raw["pretrain"] = {"data_dir": str(root / "data" / "curated" / "train"),
                       "control_data_dir": str(root / "data" / "curated" / "train"),
                       "out_dir": str(tmp_path / "models"), "storage_dir": str(tmp_path / "ray"),
                       "model": "vit-tiny", "epochs": 2, "batch_size": 32, "lr": 2e-3, "warmup_steps": 2,
                       "checkpoint_every": 4, "log_every": 2, "threads_per_worker": 1} | pretrain_cfg
    return parse_params(raw)


def log_of(out: Path) -> list[dict]:
    """The per-step records of the run exported to out."""
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def clean_params(setup: tuple[Path, dict], tmp_path: Path, **cfg):
    """Params to clean the models in <root>/data/models/pretrain on setup ((root, raw params) of
    poisoned_tiny), a 2-lr sweep on Ray writing under tmp_path."""
    from tasks.config import parse_params

    root, raw = setup
    raw = json.loads(json.dumps(raw))
    raw["clean"] = {"data_dir": str(root / "data" / "poisoned" / "cleaning"),
                    "eval_dir": str(root / "data" / "poisoned" / "eval"),
                    "models_dir": str(root / "data" / "models" / "pretrain"), "out_dir": str(tmp_path / "clean"),
                    "models": ["mmcl"], "lrs": [1e-3, 3e-3], "epochs": 2, "batch_size": 16, "warmup_steps": 2,
                    "runner": {"kind": "ray", "workers": 2}, "threads_per_run": 1} | cfg
    return parse_params(raw)


def write_params(path: Path, params: dict) -> Path:
    """A params file; valid params are written in full, every key as params.yaml lists them (dvc.yaml
    reads paths and params by key), invalid ones as given (tests of the error messages)."""
    from tasks.config import ConfigError, dump_params, parse_params

    try:
        return dump_params(parse_params(params), path)
    except ConfigError:
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path


def copy_project(dest: Path) -> None:
    """The files a stage needs, as a fresh checkout would have them."""
    for name in ("flows", "tasks", "core", "objectives", "defences", "detectors", "models", "expectations"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)


def complete_checkpoints(storage: Path) -> list[int]:
    """Steps of the checkpoints that are fully written (Ray may still be copying one into storage)."""
    import torch

    steps = []
    for path in storage.glob("*/checkpoint_*/state.pt"):
        try:
            steps.append(torch.load(path, weights_only=True)["step"])
        except Exception:  # a copy in progress: torch raises several types for a partial zip
            continue
    return steps


def manifest_row(key: str, size: int = 8) -> dict:
    return {"key": key, "caption": f"caption of {key}", "sha256": "0" * 64, "width": size, "height": size,
            "source": "t", "split": "train", "cls": None}


def write_shards(folder: Path, n: int = 8, per_shard: int = 4, size: int = 8, odd: dict | None = None) -> None:
    """A shard folder of n samples s000, s001, ... with random `size` px PNGs and sizes.json, as the
    stages write it; `odd` maps keys to other images (bytes)."""
    from core.data.shards import ShardSink, atomic_write_json

    folder.mkdir(parents=True)
    with ShardSink(folder / "shard", per_shard) as sink:
        for i in range(n):
            key = f"s{i:03d}"
            image = (odd or {}).get(key) or png_bytes(random_image(i, (size, size)))
            sink.write({"__key__": key, "png": image, "txt": f"caption of {key}".encode()}, manifest_row(key, size))
        shards = sink.close()
    atomic_write_json(folder / "sizes.json", {s["tar"]: s["n"] for s in shards})


@pytest.fixture
def browser():
    """A real headless Chromium (Debian's chromium and chromium-driver; make test installs them) driven by
    Selenium; `browser.text_when(url, *needles)` loads a page (url None: stays on the current one) and waits
    until its text shows every needle."""
    import time

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("Debian's chromium and chromium-driver are not installed (make test installs them: "
                    "apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(options=options, service=Service(driver))

    def text_when(url: str | None, *needles: str, timeout: float = 60) -> str:
        if url is not None:
            chrome.get(url)
        url = chrome.current_url
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:  # the page is a single-page app: its text arrives after load
            text = chrome.find_element(By.TAG_NAME, "body").text
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        raise AssertionError(f"{url} did not show {needles} within {timeout} s; it shows:\n{text[-2000:]}")

    chrome.text_when = text_when
    chrome.by = By
    yield chrome
    chrome.quit()


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on 127.0.0.1 (a free port, its own database): the API URL, the UI at its root."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_UI_API_URL=url)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"prefect server start did not answer on {url} within 120 s")
            time.sleep(1)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
