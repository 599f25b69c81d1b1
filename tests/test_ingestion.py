"""Real users' files (issue 12): tar member layouts, all-quarantined runs, EXIF orientation, CSV text
encodings, ImageNet synset folders and name mappings, image-folder hygiene, checkpoint formats and
the same image under several captions. Each input is a small file made here."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks import curate
from tasks.config import ConfigError, parse_params
from tasks.curate import CurateError
from core.checkpoint import CheckpointError, load_model, read_state_dict
from core.data.images import decode_image
from core.data.shards import TruncatedTar, iter_tar_samples, member_key, read_manifest
from core.data.sources import (
    SourceError, class_names, eval_metadata, expand_urls, key_part, plan, read_partition, shard_ids,
)
from tests.conftest import REPO, png_bytes, random_image, tiny_params


def curate_only(tmp_path, sources, **curate_cfg):
    """Params whose sources are exactly `sources` (no generated corpus)."""
    raw = tiny_params(tmp_path, sources, **curate_cfg)
    raw["curate"]["sources"] = sources
    return parse_params(raw)


def write_members(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# 1. Sample keys from tar member paths

@pytest.mark.parametrize("path, expected", [
    ("000000.jpg", ("000000", "jpg")),
    ("./000000.jpg", ("000000", "jpg")),
    ("cc3m.v1/000000.jpg", ("cc3m.v1/000000", "jpg")),
    ("./a.b/c.d/0001.seg.png", ("a.b/c.d/0001", "seg.png")),
    ("/abs/000.txt", ("abs/000", "txt")),
])
def test_member_key_is_webdatasets_rule(path, expected):
    assert member_key(path) == expected


def test_tars_made_with_dot_paths_and_dotted_folders_keep_every_sample(tmp_path):
    """`tar -C dir -cf x.tar .` (members ./000000.jpg) and a dotted folder (cc3m.v1/000000.jpg): 3 tars x 3
    samples, all 9 curated, with unique keys although the member names repeat in every tar."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for t in range(3):
        src = tmp_path / f"src{t}" / ("cc3m.v1" if t == 2 else "")
        src.mkdir(parents=True)
        for i in range(3):
            (src / f"{i:06d}.jpg").write_bytes(png_bytes(random_image(10 * t + i), "JPEG"))
            (src / f"{i:06d}.txt").write_text(f"tar {t} sample {i} caption")
            (src / f"{i:06d}.json").write_text("{}")
        (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # left behind by macOS: not a sample
        (src / f"._{0:06d}.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
        subprocess.run(["tar", "-C", str(tmp_path / f"src{t}"), "-cf", str(shards / f"{t:05d}.tar"), "."], check=True)
    names = tarfile.open(shards / "00000.tar").getnames()
    assert "./000000.jpg" in names and "./.DS_Store" in names

    params = curate_only(tmp_path, [{"kind": "webdataset", "name": "web", "urls": str(shards / "*.tar")}])
    stats = curate.run_sequential(params)
    assert stats["sources"]["web"] == {"seen": 9, "written": 9, "quarantined": {}, "captions_truncated": 0}
    train = read_manifest(params.curate.out_dir / "train").to_pandas()
    assert len(set(train["key"])) == 9
    assert set(train["caption"]) == {f"tar {t} sample {i} caption" for t in range(3) for i in range(3)}
    assert "web_00002_cc3m-v1-000000-" in " ".join(train["key"])  # readable, with a hash of the exact path


def test_keys_stay_unique_across_folders_and_shards(tmp_path):
    """Two tars of the same name in different folders, each with two folders sharing member names."""
    seed = iter(range(100))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_members(tmp_path / folder / "00000.tar", {
            f"{sub}/000.{ext}": png_bytes(random_image(next(seed))) if ext == "png" else b"a caption"
            for sub in ("x", "y") for ext in ("png", "txt")})
    assert shard_ids([str(tmp_path / "a" / "00000.tar"), str(tmp_path / "b" / "00000.tar")]) == ["a/00000", "b/00000"]
    assert shard_ids([str(tmp_path / "a" / "00000.tar"), str(tmp_path / "a" / "00001.tar")]) == ["00000", "00001"]
    src = parse_params(tiny_params(tmp_path, [{"kind": "webdataset", "name": "web",
                                               "urls": str(tmp_path / "*/00000.tar")}])).curate.sources[1]
    recs = [rec for part in plan([src], 10) for rec in read_partition(src, part, 0, 32)]
    assert len(recs) == 4 and len({r.key for r in recs}) == 4 and all(r.rejected is None for r in recs)
    # Distinct texts never share a key part, even when their readable forms agree.
    assert len({key_part(t) for t in ("a.b", "a-b", "a_b", "a/b", "a-b-")}) == 5
    assert key_part("000123") == "000123"


def test_left_behind_members_are_skipped(tmp_path):
    path = tmp_path / "x.tar"
    write_members(path, {"__MACOSX/._000.jpg": b"fork", "000.jpg": png_bytes(random_image(1), "JPEG"),
                         "000.txt": b"caption", "._000.jpg": b"fork", "sub/.hidden.txt": b"x", "_stats.json": b"{}"})
    assert [s["__key__"] for s in iter_tar_samples(path)] == ["000"]


# 2. All samples rejected

def test_all_samples_quarantined_is_named_with_counts(tmp_path):
    csv = tmp_path / "pairs.csv"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    csv.write_text("image,caption\nmissing1.png,one caption\nmissing2.png,two caption\nbad.png,three caption\n")
    params = curate_only(tmp_path, [{"kind": "csv", "name": "mine", "path": str(csv)}])
    with pytest.raises(CurateError) as err:
        curate.run_sequential(params)
    msg = str(err.value)
    assert "no train sample: all 3 sample(s) of source(s) ['mine'] were quarantined" in msg
    assert "missing_file=2, undecodable_image=1" in msg and "quarantine.parquet" in msg
    assert "expect_table_row_count" not in msg
    assert pq.read_table(tmp_path / "data" / "curated.partial" / "quarantine.parquet").num_rows == 3
    assert not params.curate.out_dir.exists()


def test_eval_class_left_without_images_is_named(tmp_path):
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
    (root / "cat" / "0.png").write_bytes(png_bytes(random_image(1)))
    (root / "dog" / "0.png").write_bytes(b"broken")
    params = curate_only(tmp_path, [{"kind": "image_folder", "name": "folder", "root": str(root)}])
    with pytest.raises(CurateError, match=r"eval set eval/folder: class\(es\) \['dog'\] have no curated image"):
        curate.run_sequential(params)


# 3. EXIF orientation

def sideways_jpeg() -> bytes:
    """Stored 64x32 with EXIF Orientation 6 (rotate 90 degrees clockwise to view): viewed, its top is red."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :] = (0, 0, 255)
    arr[:, :16] = (255, 0, 0)  # the stored left edge is the viewed top
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    im = decode_image(sideways_jpeg(), 10 ** 6)
    assert im.size == (32, 64)
    top, bottom = np.asarray(im)[2].mean(0), np.asarray(im)[-3].mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200

    (tmp_path / "photo.jpg").write_bytes(sideways_jpeg())
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\nphoto.jpg,a photo held sideways\n")
    params = curate_only(tmp_path, [{"kind": "csv", "name": "mine", "path": str(csv)}], resize_mode="squash")
    curate.run_sequential(params)
    tar = next((params.curate.out_dir / "train").glob("*.tar"))
    (sample,) = iter_tar_samples(tar)
    with Image.open(io.BytesIO(sample["png"])) as curated:
        arr = np.asarray(curated.convert("RGB"))
        assert not curated.getexif()
    assert arr[:6].mean((0, 1))[0] > 200 and arr[-6:].mean((0, 1))[2] > 200  # red top, blue bottom


# 4. CSV text encodings

def write_csv_images(tmp_path, n=2):
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(random_image(i)))


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    write_csv_images(tmp_path)
    csv = tmp_path / "pairs.csv"
    csv.write_bytes("image,caption\n0.png,café au lait\n1.png,naïve art\n".encode("utf-8-sig"))
    params = curate_only(tmp_path, [{"kind": "csv", "name": "mine", "path": str(csv)}])
    stats = curate.run_sequential(params)
    assert stats["sources"]["mine"]["written"] == 2
    assert sorted(read_manifest(params.curate.out_dir / "train").column("caption").to_pylist()) == [
        "café au lait", "naïve art"]


def test_non_utf8_csv_names_file_line_and_bytes_and_encoding_option_reads_it(tmp_path):
    write_csv_images(tmp_path, 4)
    csv = tmp_path / "excel.csv"
    rows = ["image,caption", "0.png,plain ascii caption", "1.png,another plain one", "2.png,café crème",
            "3.png,a “quoted” word"]
    csv.write_bytes(("\r\n".join(rows) + "\r\n").encode("cp1252"))
    source = {"kind": "csv", "name": "mine", "path": str(csv)}
    with pytest.raises(SourceError) as err:
        curate.plan_partitions(curate_only(tmp_path, [source]))
    msg = str(err.value)
    assert f"source 'mine': {csv} line 4: bytes e9 at byte 10 are not valid utf-8-sig (invalid continuation byte)" in msg
    assert "set this source's `encoding`" in msg and "cp1252" in msg

    params = curate_only(tmp_path, [source | {"encoding": "cp1252"}])
    curate.run_sequential(params)
    assert sorted(read_manifest(params.curate.out_dir / "train").column("caption").to_pylist()) == [
        "a \"quoted\" word", "another plain one", "café crème", "plain ascii caption"]  # ftfy uncurls quotes


def test_utf16_csv_with_encoding_option(tmp_path):
    write_csv_images(tmp_path)
    csv = tmp_path / "pairs.csv"
    csv.write_bytes("image\tcaption\n0.png\tñandú\n1.png\t日本の写真\n".encode("utf-16"))
    params = curate_only(tmp_path, [{"kind": "csv", "name": "mine", "path": str(csv), "sep": "\t",
                                     "encoding": "utf-16"}])
    curate.run_sequential(params)
    assert sorted(read_manifest(params.curate.out_dir / "train").column("caption").to_pylist()) == ["ñandú", "日本の写真"]


def test_unknown_encoding_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"curate\.sources\.1\.csv\.encoding.*unknown text encoding 'utf-9'"):
        parse_params(tiny_params(tmp_path, [{"kind": "csv", "name": "m", "path": "x.csv", "encoding": "utf-9"}]))


# 5. ImageNet folders named by synset id, and the user's own mapping

def image_folder(tmp_path, classes: dict[str, int], name="folder"):
    root = tmp_path / name
    for k, (cls, n) in enumerate(classes.items()):
        (root / cls).mkdir(parents=True)
        for j in range(n):
            (root / cls / f"ILSVRC2012_val_{k:04d}{j:04d}.JPEG").write_bytes(png_bytes(random_image(100 * k + j), "JPEG"))
    return root


def folder_source(tmp_path, root, **extra):
    return parse_params(tiny_params(tmp_path, [{"kind": "image_folder", "name": "inet", "root": str(root)} | extra])
                        ).curate.sources[1]


def test_imagenet_synset_folders_get_open_clips_class_names(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root = image_folder(tmp_path, {"n07753592": 1, "n01440764": 1, "n04592741": 1, "n00004475": 1})
    assert class_names(folder_source(tmp_path, root)) == ["organism", "tench", "airplane wing", "banana"]
    assert IMAGENET_CLASSNAMES[954] == "banana"
    meta = eval_metadata(folder_source(tmp_path, root))
    assert meta["classnames"][3] == "banana" and len(meta["templates"]) == 80

    # Through curate: the captions and classes.json carry the names, so `poison.target: banana` resolves.
    params = curate_only(tmp_path, [{"kind": "image_folder", "name": "inet", "root": str(root)}])
    curate.run_sequential(params)
    classes = json.loads((params.curate.out_dir / "eval" / "inet" / "classes.json").read_text())
    assert classes["classnames"].index("banana") == 3
    eval_rows = read_manifest(params.curate.out_dir / "eval" / "inet").to_pandas()
    assert "a photo of a banana." in set(eval_rows["caption"])


@pytest.mark.parametrize("fmt", ["json", "csv", "tsv"])
def test_a_users_folder_to_name_mapping(tmp_path, fmt):
    root = image_folder(tmp_path, {"c01": 1, "c02": 1})
    path = tmp_path / f"names.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({"c01": "golden retriever", "c02": "banana", "c99": "unused"}))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"folder{sep}name\nc01{sep}golden retriever\nc02{sep}banana\n", encoding="utf-8-sig")
    assert class_names(folder_source(tmp_path, root, classnames=str(path))) == ["golden retriever", "banana"]


def test_mapping_errors_name_the_folder_and_file(tmp_path, caplog):
    root = image_folder(tmp_path, {"c01": 1, "c02": 1})
    partial = tmp_path / "names.json"
    partial.write_text(json.dumps({"c01": "dog"}))
    with pytest.raises(SourceError, match=r"no class name for folder\(s\) \['c02'\] .* in .*names\.json"):
        plan([folder_source(tmp_path, root, classnames=str(partial))], 10)
    same = tmp_path / "same.csv"
    same.write_text("c01,dog\nc02,dog\n")
    assert class_names(folder_source(tmp_path, root, classnames=str(same))) == ["dog", "dog"]  # as ImageNet's own
    assert "several folders get the same class name ('dog': ['c01', 'c02'])" in caplog.text
    bad = tmp_path / "bad.csv"
    bad.write_text("c01,dog\nc02\n")
    with pytest.raises(SourceError, match=r"bad\.csv line 2: expected 2 columns"):
        class_names(folder_source(tmp_path, root, classnames=str(bad)))
    with pytest.raises(SourceError, match="classnames file not found"):
        class_names(folder_source(tmp_path, root, classnames=str(tmp_path / "nope.json")))
    unknown = image_folder(tmp_path, {"n07753592": 1, "n99999999": 1}, name="unknown")
    with pytest.raises(SourceError, match=r"\['n99999999'\].*give a classnames file"):
        class_names(folder_source(tmp_path, unknown))


# 6. Image-folder hygiene

def test_hidden_and_left_behind_entries_are_not_classes_or_samples(tmp_path):
    root = image_folder(tmp_path, {"cat": 2, "dog": 1})
    for junk in (".ipynb_checkpoints", "__MACOSX", ".git"):
        (root / junk).mkdir()
        (root / junk / "x.png").write_bytes(png_bytes(random_image(9)))
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / "._0.JPEG").write_bytes(b"\0\5\26\7")
    (root / "dog" / "Thumbs.db").write_bytes(b"\0")
    (root / "dog" / "more").mkdir()
    (root / "dog" / "more" / "nested.png").write_bytes(png_bytes(random_image(8)))  # nested images count
    src = folder_source(tmp_path, root)
    assert class_names(src) == ["cat", "dog"]
    recs = [r for part in plan([src], 10) for r in read_partition(src, part, 0, 32)]
    assert [(r.cls, r.origin.split("/")[-1]) for r in recs] == [
        (0, "ILSVRC2012_val_00000000.JPEG"), (0, "ILSVRC2012_val_00000001.JPEG"),
        (1, "ILSVRC2012_val_00010000.JPEG"), (1, "nested.png")]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = image_folder(tmp_path, {"cat": 1, "dog": 0, "emu": 0})
    (root / "emu" / ".DS_Store").write_bytes(b"\0")  # only a hidden file: still empty
    with pytest.raises(SourceError, match=r"class folder\(s\) \['dog', 'emu'\] under .* hold no image"):
        plan([folder_source(tmp_path, root)], 10)


# 7. Checkpoint formats

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.proj(x)


def test_checkpoint_formats_give_one_line_errors_or_load(tmp_path):
    model = Tiny()
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "scripted.pt")
    assert "scripted.pt is a TorchScript archive" in str(err.value) and "state_dict()" in str(err.value)

    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "whole.pt")
    assert "whole.pt holds a pickled" in str(err.value) and "Tiny object" in str(err.value)
    assert "\n" not in str(err.value)

    torch.save(model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable torch checkpoint"):
        read_state_dict(tmp_path / "cut.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt holds a list, not a state_dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")

    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "m.safetensors")
    torch.save({"module._orig_mod." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "open_clip_train.pt")
    for name in ("good.pt", "m.safetensors", "ddp.pt", "open_clip_train.pt"):
        assert sorted(read_state_dict(tmp_path / name)) == ["proj.bias", "proj.weight"], name


def test_evaluate_command_says_what_a_bad_checkpoint_is_in_one_line(tmp_path):
    torch.save(Tiny(), tmp_path / "whole.pt")
    done = subprocess.run([sys.executable, "-m", "flows.evaluate", "--checkpoint", str(tmp_path / "whole.pt"),
                           "--model", "rn-tiny"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'whole.pt'} holds a pickled ")


def test_ddp_prefixed_open_clip_state_dict_loads_into_the_model(tmp_path):
    from core.model import build_model

    model, _, _ = build_model("rn-tiny", "mmcl")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    loaded, _, _ = load_model(tmp_path / "ddp.pt", "rn-tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# 8. The same image under several captions

def test_same_image_under_several_captions_passes_and_is_reported(tmp_path):
    write_csv_images(tmp_path, 3)
    csv = tmp_path / "coco.csv"
    csv.write_text("image,caption\n" + "".join(f"{i}.png,caption {c} of image {i}\n" for i in range(3) for c in range(2))
                   + "2.png,only once more\n")
    source = {"kind": "csv", "name": "coco", "path": str(csv)}
    strict = curate_only(tmp_path, [source], validation={"sha256_unique_mostly": 1.0})
    from core.data.validation import ValidationFailed

    with pytest.raises(ValidationFailed, match=r"set by params curate\.validation\.sha256_unique_mostly"):
        curate.run_sequential(strict)
    stage = curate.staging_dir(strict)
    stamps = {p.name: p.stat().st_mtime_ns for p in stage.glob("*.done.json")}
    assert stamps

    default = curate_only(tmp_path, [source])
    assert curate.staging_dir(default) == stage  # validation settings do not change what is computed
    other = curate_only(tmp_path, [source], caption={"min_chars": 4})
    curate.process_partition(other, curate.plan_partitions(other)[0])  # a failed run with other settings
    assert curate.staging_dir(other).is_dir()

    stats = curate.run_sequential(default)
    assert stats["sources"]["coco"]["written"] == 7
    assert stats["repeated_images"] == {"train": 1.0}  # every image is under several captions
    assert not stage.exists() and not curate.staging_dir(other).exists()  # stale staging removed on success
    report = json.loads((default.curate.out_dir / "validation.json").read_text())["reports"][0]
    assert {r["expectation"] for r in report["results"]} >= {"expect_compound_columns_to_be_unique"}


def test_repeated_share_counts_rows_whose_image_another_row_holds(tmp_path):
    write_csv_images(tmp_path, 3)
    csv = tmp_path / "web.csv"
    csv.write_text("image,caption\n0.png,first\n0.png,second\n1.png,third\n2.png,fourth\n")
    stats = curate.run_sequential(curate_only(tmp_path, [{"kind": "csv", "name": "web", "path": str(csv)}]))
    assert stats["repeated_images"] == {"train": 0.5}


def test_a_framework_prefix_shared_by_every_key_is_fitted_to_the_model(tmp_path):
    from core.model import build_model

    model, _, _ = build_model("rn-tiny", "mmcl")
    torch.save({"state_dict": {"model.clip." + k: v for k, v in model.state_dict().items()}}, tmp_path / "l.ckpt")
    loaded, _, _ = load_model(tmp_path / "l.ckpt", "rn-tiny")
    assert torch.equal(loaded.state_dict()["logit_scale"], model.state_dict()["logit_scale"])
    torch.save({"other." + k: v for k, v in model.state_dict().items() if k != "logit_scale"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['logit_scale'\]"):
        load_model(tmp_path / "x.pt", "rn-tiny")


def test_hard_linked_members_are_read_as_their_file(tmp_path):
    """`tar` stores a second name of the same file as a hard link: the same image under two captions."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "000000.jpg").write_bytes(png_bytes(random_image(1), "JPEG"))
    (src / "000001.jpg").hardlink_to(src / "000000.jpg")
    (src / "000000.txt").write_text("a dog on a beach")
    (src / "000001.txt").write_text("my dog at the sea")
    subprocess.run(["tar", "-C", str(src), "-cf", str(tmp_path / "00000.tar"), "."], check=True)
    assert any(m.islnk() for m in tarfile.open(tmp_path / "00000.tar").getmembers())
    samples = list(iter_tar_samples(tmp_path / "00000.tar"))
    assert len(samples) == 2 and samples[0]["jpg"] == samples[1]["jpg"]


def test_tar_captions_in_another_encoding_are_quarantined_or_read_with_the_option(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_members(shards / "00000.tar", {"0.jpg": png_bytes(random_image(1), "JPEG"), "0.txt": "crème brûlée".encode("cp1252"),
                                         "1.jpg": png_bytes(random_image(2), "JPEG"), "1.txt": b"plain caption"})
    web = {"kind": "webdataset", "name": "web", "urls": str(shards / "*.tar")}
    stats = curate.run_sequential(curate_only(tmp_path / "a", [web]))
    assert stats["sources"]["web"]["quarantined"] == {"undecodable_caption": 1}
    detail = pq.read_table(tmp_path / "a" / "data" / "curated" / "quarantine.parquet").column("detail")[0].as_py()
    assert detail == "bytes e8 at byte 3 are not valid utf-8-sig (invalid continuation byte)"
    params = curate_only(tmp_path / "b", [web | {"encoding": "cp1252"}])
    curate.run_sequential(params)
    assert sorted(read_manifest(params.curate.out_dir / "train").column("caption").to_pylist()) == [
        "crème brûlée", "plain caption"]


def test_utf16_csv_without_the_option_is_named_as_utf16(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_bytes("image,caption\n0.png,x\n".encode("utf-16"))
    with pytest.raises(SourceError, match=r"line 1: bytes ff at byte 1 are not valid .*UTF-16 byte-order mark: "
                                          r"encoding utf-16"):
        plan([parse_params(tiny_params(tmp_path, [{"kind": "csv", "name": "c", "path": str(csv)}])).curate.sources[1]], 10)


def test_empty_sources_and_numbered_class_folders_are_named(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n")
    with pytest.raises(SourceError, match=r"source 'mine': .*pairs\.csv has a header and no row"):
        curate.plan_partitions(curate_only(tmp_path, [{"kind": "csv", "name": "mine", "path": str(csv)}]))
    write_members(tmp_path / "00000.tar", {"_stats.json": b"{}"})
    with pytest.raises(CurateError, match=r"curate wrote no train sample: source\(s\) \['web'\] hold no sample"):
        curate.run_sequential(curate_only(tmp_path, [{"kind": "webdataset", "name": "web",
                                                      "urls": str(tmp_path / "00000.tar")}]))
    root = image_folder(tmp_path, {"0": 1, "1": 1, "10": 1})  # ImageNetV2's layout: class indices
    with pytest.raises(SourceError, match=r"class folders of .* are numbers .* give a classnames file"):
        class_names(folder_source(tmp_path, root))


def test_malformed_exif_keeps_the_image_as_stored():
    im = Image.fromarray(np.full((8, 16, 3), 200, np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff")  # a directory that runs off the end
    assert decode_image(buf.getvalue(), 10 ** 6).size == (16, 8)


def test_tar_names_with_dots_or_other_endings_keep_keys_unique(tmp_path):
    for name in ("shard.000.tar", "shard.001.tar", "00000.tar", "00000.tar.gz", "nested/deeper/00000.tar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        mode = "w:gz" if name.endswith(".gz") else "w"
        with tarfile.open(tmp_path / name, mode) as tar:
            for ext, data in (("jpg", png_bytes(random_image(len(name)), "JPEG")), ("txt", name.encode())):
                info = tarfile.TarInfo(f"000001.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    params = curate_only(tmp_path, [{"kind": "webdataset", "name": "web",
                                     "urls": str(tmp_path / "{*.tar,*.tar.gz,**/*.tar,00000.tar}")}])
    stats = curate.run_sequential(params)
    assert stats["sources"]["web"] == {"seen": 5, "written": 5, "quarantined": {}, "captions_truncated": 0}
    keys = read_manifest(params.curate.out_dir / "train").column("key").to_pylist()
    assert len(set(keys)) == 5 and "web_00000_000001" in keys and "web_shard-000-" in " ".join(keys)


def test_a_rerun_after_a_failure_past_finalize_equals_a_fresh_run(tmp_path):
    """Duplicates across partitions, then a validation failure: the rerun with a looser setting reuses the
    staged partitions and publishes what an uninterrupted run does, byte for byte and count for count."""
    write_csv_images(tmp_path, 4)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n0.png,zero\n1.png,one\n2.png,two\n3.png,three\n0.png,zero\n1.png,one again\n"
                   "2.png,two\n")
    source = {"kind": "csv", "name": "mine", "path": str(csv)}
    from core.data.validation import ValidationFailed

    with pytest.raises(ValidationFailed):
        curate.run_sequential(curate_only(tmp_path / "a", [source], shard_maxcount=3,
                                          validation={"sha256_unique_mostly": 1.0}))
    again = curate.run_sequential(curate_only(tmp_path / "a", [source], shard_maxcount=3))
    fresh = curate.run_sequential(curate_only(tmp_path / "b", [source], shard_maxcount=3))
    for stats in (again, fresh):
        assert stats["total"] == {"seen": 7, "written": 5, "quarantined": {"duplicate": 2}}
    outs = [tmp_path / run / "data" / "curated" for run in ("a", "b")]
    assert [json.loads((o / "train" / "sizes.json").read_text()) for o in outs] == [
        {"shard-000000.tar": 3, "shard-000001.tar": 2}] * 2  # the third partition held only a duplicate
    for name in ("shard-000000.tar", "shard-000001.tar", "quarantine.parquet"):
        sub = "" if name.endswith(".parquet") else "train"
        assert (outs[0] / sub / name).read_bytes() == (outs[1] / sub / name).read_bytes(), name
    origins = pq.read_table(outs[0] / "quarantine.parquet").column("origin").to_pylist()
    assert origins == [f"{csv} line 6: 0.png", f"{csv} line 8: 2.png"]  # the source's file and line


def test_utf16_without_a_byte_order_mark_and_mixed_folders(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_bytes("image,caption\n0.png,x\n".encode("utf-16-le"))
    src = {"kind": "csv", "name": "c", "path": str(csv)}
    with pytest.raises(SourceError, match=r"line 1: .*not valid utf-16 \(UTF-16 stream does not start with BOM\)"):
        plan([parse_params(tiny_params(tmp_path, [src | {"encoding": "utf-16"}])).curate.sources[1]], 10)
    with pytest.raises(SourceError, match=r"lacks column.*NUL bytes, as UTF-16 without a byte-order mark does: "
                                          r"encoding utf-16-le"):
        plan([parse_params(tiny_params(tmp_path, [src])).curate.sources[1]], 10)
    root = image_folder(tmp_path, {"n07753592": 1, "my_dog": 1})
    assert class_names(folder_source(tmp_path, root)) == ["my dog", "banana"]


def test_stage_command_reports_bad_input_without_tracebacks(tmp_path, prefect_api_url):
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\nmissing.png,a caption\n")
    raw = tiny_params(tmp_path, [])
    raw["curate"]["sources"] = [{"kind": "csv", "name": "mine", "path": str(csv)}]
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "-m", "flows.curate", "--params", str(tmp_path / "params.yaml")], cwd=REPO,
                          env=dict(os.environ, PREFECT_API_URL=prefect_api_url), capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: curate wrote no train sample: all 1 sample(s) of source(s) ['mine'] were quarantined "
        f"(missing_file=1); see {tmp_path / 'data' / 'curated.partial' / 'quarantine.parquet'}")


def test_the_whole_imagenet_1k_folder_set_is_named_by_open_clip(tmp_path):
    """All 1,000 synset folders (names repeat twice in open_clip's list, as in the benchmark)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    for wnid in ImageNetInfo("imagenet-1k").label_names():
        (tmp_path / "val" / wnid).mkdir(parents=True)
    assert class_names(folder_source(tmp_path, tmp_path / "val")) == list(IMAGENET_CLASSNAMES)


def cut(path, at: int):
    path.write_bytes(path.read_bytes()[:at])


def test_damaged_tars_lose_only_the_damaged_sample(tmp_path):
    """Members in directory order cut inside the last member: the other samples are read; a broken
    header, a missing end marker, a lost hard-link target and a cut .tar.gz each name one sample."""
    path = tmp_path / "dir-order.tar"
    order = ["a.jpg", "b.jpg", "b.txt", "c.jpg", "c.txt", "a.txt"]
    write_members(path, {name: png_bytes(random_image(i), "JPEG") if name.endswith("jpg") else b"caption " * 200
                         for i, name in enumerate(order)})
    offsets = {m.name: m.offset_data for m in tarfile.open(path).getmembers()}
    cut(path, offsets["a.txt"] + 100)
    got = list(iter_tar_samples(path, keep_going=True))
    assert [(s["__key__"], "__damaged__" in s) for s in got] == [("a", True), ("b", False), ("c", False)]
    with pytest.raises(TruncatedTar) as err:
        list(iter_tar_samples(path))
    assert err.value.key == "a"

    whole = tmp_path / "whole.tar"
    write_members(whole, {f"{k}.{e}": b"x" * 600 for k in "pqr" for e in ("jpg", "txt")})
    header = {m.name: m.offset for m in tarfile.open(whole).getmembers()}["r.jpg"]
    data = bytearray(whole.read_bytes())
    data[header:header + 100] = b"\x07" * 100  # a broken header: tarfile would stop there quietly
    (tmp_path / "broken.tar").write_bytes(bytes(data))
    got = list(iter_tar_samples(tmp_path / "broken.tar", keep_going=True))
    assert [(s["__key__"], s.get("__damaged__", "")[:21]) for s in got] == [("p", ""), ("q", "unreadable header at ")]

    (tmp_path / "nomarker.tar").write_bytes(whole.read_bytes()[:header + 512 + 1024])  # ends after r.jpg's data
    got = list(iter_tar_samples(tmp_path / "nomarker.tar", keep_going=True))
    assert [(s["__key__"], "__damaged__" in s) for s in got] == [("p", False), ("q", False), ("r", True)]
    assert "without its end-of-archive marker" in got[-1]["__damaged__"]

    with tarfile.open(tmp_path / "link.tar", "w") as tar:
        info = tarfile.TarInfo("s.jpg")
        info.type, info.linkname = tarfile.LNKTYPE, "gone.jpg"
        tar.addfile(info)
        for name in ("t.jpg", "t.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    got = list(iter_tar_samples(tmp_path / "link.tar", keep_going=True))
    assert [(s["__key__"], "__damaged__" in s) for s in got] == [("s", True), ("t", False)]

    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        for i, name in enumerate(order):
            data = png_bytes(random_image(i), "JPEG")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [s["__key__"] for s in iter_tar_samples(tmp_path / "x.tar.gz")] == ["a", "b", "c"]
    cut(tmp_path / "x.tar.gz", (tmp_path / "x.tar.gz").stat().st_size // 2)
    got = list(iter_tar_samples(tmp_path / "x.tar.gz", keep_going=True))
    assert got and "__damaged__" in got[-1] and all("__damaged__" not in s for s in got[:-1])


def test_member_paths_in_hidden_folders_count_and_extensionless_members_do_not(tmp_path):
    path = tmp_path / "x.tar"
    write_members(path, {"home/u/.cache/cc/000001.jpg": b"img", "home/u/.cache/cc/000001.txt": b"cap",
                         "README": b"about these shards", "__MACOSX/cc/._000001.jpg": b"fork"})
    assert [s["__key__"] for s in iter_tar_samples(path)] == ["home/u/.cache/cc/000001"]


def test_links_pipes_and_unreadable_files_in_image_folders(tmp_path):
    root = image_folder(tmp_path, {"cat": 1, "dog": 1})
    (root / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "dog" / "alias.JPEG").symlink_to(next((root / "cat").iterdir()))
    os.mkfifo(root / "cat" / "pipe")
    src = folder_source(tmp_path, root)
    recs = [r for part in plan([src], 10) for r in read_partition(src, part, 0, 32)]
    assert [(Path(r.origin).name, r.rejected.reason if r.rejected else None) for r in recs] == [
        ("ILSVRC2012_val_00000000.JPEG", None), ("ILSVRC2012_val_00010000.JPEG", None), ("alias.JPEG", None),
        ("gone.png", "missing_file")]


def test_one_tar_by_two_paths_is_read_once_and_codecs_must_be_text(tmp_path):
    (tmp_path / "d").mkdir()
    write_members(tmp_path / "d" / "00000.tar", {"0.jpg": b"x", "0.txt": b"y"})
    (tmp_path / "link").symlink_to(tmp_path / "d")
    urls = expand_urls(f"{{{tmp_path}/d/00000.tar,{tmp_path}/d/./00000.tar,{tmp_path}/link/00000.tar}}")
    assert urls == [f"{tmp_path}/d/00000.tar"]
    with pytest.raises(ConfigError, match=r"curate\.sources\.1\.csv\.encoding.*unknown text encoding 'hex'"):
        parse_params(tiny_params(tmp_path, [{"kind": "csv", "name": "m", "path": "x.csv", "encoding": "hex"}]))


def test_success_keeps_the_staging_of_another_output_folder(tmp_path):
    write_csv_images(tmp_path, 2)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n0.png,zero caption\n1.png,one caption\n")
    source = {"kind": "csv", "name": "mine", "path": str(csv)}
    other = curate_only(tmp_path, [source], out_dir=str(tmp_path / "other"))
    curate.process_partition(other, curate.plan_partitions(other)[0])  # another study's run, crashed or running
    mine = curate_only(tmp_path, [source])
    assert curate.staging_dir(mine) != curate.staging_dir(other)
    curate.run_sequential(mine)
    assert curate.staging_dir(other).is_dir() and not curate.staging_dir(mine).exists()


@pytest.mark.parametrize("mode, suffix, readable", [("w:bz2", ".tar.bz2", 0), ("w:xz", ".tar.xz", 3), ("w:gz", ".tgz", 3)])
def test_compressed_tars_in_directory_order_and_cut_short(tmp_path, mode, suffix, readable):
    """bzip2 decompresses whole 900 kB blocks: a cut in the only block leaves nothing to read."""
    names = [f"{k:03d}.{e}" for k in range(8) for e in ("txt", "jpg")][::-1]  # not adjacent by key order
    path = tmp_path / f"x{suffix}"
    with tarfile.open(path, mode) as tar:
        for i, name in enumerate(names):
            data = np.random.default_rng(i).integers(0, 256, 3000, dtype=np.uint8).tobytes()  # incompressible
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert sorted(s["__key__"] for s in iter_tar_samples(path)) == [f"{k:03d}" for k in range(8)]
    cut(path, int(path.stat().st_size * 0.6))
    got = list(iter_tar_samples(path, keep_going=True))
    damaged = [s["__key__"] for s in got if "__damaged__" in s]
    complete = [s for s in got if "__damaged__" not in s]
    assert len(damaged) == 1 and all(len(s) == 3 for s in complete)  # each kept sample has jpg and txt
    assert len(complete) >= readable  # what decompressed before the cut is read


def test_globs_take_tars_only(tmp_path):
    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "sub/00001.tar"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_members(tmp_path / name, {"0.jpg": b"x"}) if name.endswith(".tar") else (tmp_path / name).write_text("{}")
    assert expand_urls(str(tmp_path / "*")) == [str(tmp_path / "00000.tar")]
    assert expand_urls(str(tmp_path / "**")) == [str(tmp_path / "00000.tar"), str(tmp_path / "sub" / "00001.tar")]


def test_malformed_csv_rows_are_named_not_merged(tmp_path):
    write_csv_images(tmp_path, 4)
    source = {"kind": "csv", "name": "mine", "path": str(tmp_path / "pairs.csv")}
    (tmp_path / "pairs.csv").write_text('image,caption\n0.png,fine\n1.png,"unclosed quote caption\n2.png,two\n'
                                        '3.png,three\n')
    with pytest.raises(SourceError, match=r"pairs\.csv line 5: unexpected end of data \(a quote that never closes"):
        curate.plan_partitions(curate_only(tmp_path, [source]))
    (tmp_path / "pairs.csv").write_text('image,caption\n0.png,fine\n\n1.png,"two\nlines"\n2.png,a, then more\n')
    params = curate_only(tmp_path, [source])
    stats = curate.run_sequential(params)
    assert stats["sources"]["mine"]["quarantined"] == {"malformed_row": 1}
    quarantine = pq.read_table(params.curate.out_dir / "quarantine.parquet").to_pylist()
    assert quarantine[0]["origin"] == f"{tmp_path / 'pairs.csv'} line 6: 2.png"
    assert "3 fields, the header has 2: an unquoted ',' in a field?" == quarantine[0]["detail"]
    origins = [json.loads(s["json"])["origin"] for s in iter_tar_samples(next((params.curate.out_dir / "train")
                                                                              .glob("*.tar")))]
    assert origins == [f"{tmp_path / 'pairs.csv'} line 2: 0.png", f"{tmp_path / 'pairs.csv'} lines 4-5: 1.png"]


def test_paths_that_are_not_what_they_should_be(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoint is not a file"):
        read_state_dict(tmp_path)
    with pytest.raises(SourceError, match="image folder is not a folder"):
        class_names(folder_source(tmp_path, tmp_path / "afile"))
    write_csv_images(tmp_path, 1)
    (tmp_path / "pairs.csv").write_text("image,caption\n0.png,a caption\n")
    params = curate_only(tmp_path, [{"kind": "csv", "name": "mine", "path": str(tmp_path / "pairs.csv")}],
                         out_dir=str(tmp_path / "afile" / "curated"))
    with pytest.raises(CurateError, match=r"curate\.out_dir: cannot create .*afile: (File exists|Not a directory)"):
        curate.plan_partitions(params)


def test_curated_partitions_resume_only_for_the_same_sources_and_settings(tmp_path):
    """The staging area (the curated partitions' identity) follows what changes samples: settings,
    seed and the sources' files, not the runner or validation thresholds."""
    write_csv_images(tmp_path)
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n0.png,a red square\n1.png,a blue circle\n")
    raw = tiny_params(tmp_path, [{"kind": "csv", "name": "mine", "path": str(csv)}])
    stage = curate.staging_dir(parse_params(raw))
    for how in ({"runner": {"kind": "process", "workers": 1}}, {"validation": {"sha256_unique_mostly": 0.5}}):
        assert curate.staging_dir(parse_params(raw | {"curate": raw["curate"] | how})) == stage
    assert curate.staging_dir(parse_params(raw | {"curate": raw["curate"] | {"image_size": 24}})) != stage
    assert curate.staging_dir(parse_params(raw | {"seed": 8})) != stage
    csv.write_text("image,caption\n0.png,a red square\n1.png,a green circle\n")  # the user's file changed
    curate.source_signature.cache_clear()
    assert curate.staging_dir(parse_params(raw)) != stage
