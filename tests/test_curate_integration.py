"""The curate stage end to end through a real Prefect flow, on a mix of good and broken sources."""
import hashlib
import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from flows.curate import run
from tasks import curate
from tasks.config import parse_params
from core.data.shards import read_manifest
from tests.conftest import tiny_params

pytestmark = pytest.mark.integration


def tar_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.tar"))}


def test_mixed_sources_good_written_bad_quarantined(tmp_path, prefect_api_url, mixed_sources):
    params = parse_params(tiny_params(tmp_path, [mixed_sources["csv"], mixed_sources["webdataset"],
                                                 mixed_sources["image_folder"]]))
    stats = run(params)
    out = params.curate.out_dir

    quarantine = {r["key"]: r["reason"] for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert quarantine == mixed_sources["expected_quarantine"]

    train = read_manifest(out / "train").to_pandas()
    keys = set(train["key"])
    assert set(mixed_sources["expected_good"]) <= keys
    assert not keys & set(quarantine)
    assert len(train) == 40 + len(mixed_sources["expected_good"])  # every generated pair too
    assert (train["width"] == 32).all() and (train["height"] == 32).all()

    # Every sample in the shards matches its manifest row; nothing is lost or extra.
    sizes = json.loads((out / "train" / "sizes.json").read_text())
    seen = []
    for tar_name, n in sizes.items():
        samples = list(wds.WebDataset(str(out / "train" / tar_name), shardshuffle=False).decode("pil"))
        assert len(samples) == n
        for s in samples:
            assert s["png"].size == (32, 32) and s["png"].mode == "RGB"
            assert s["json"]["sha256"] == train.set_index("key").loc[s["__key__"], "sha256"]
            seen.append(s["__key__"])
    assert sorted(seen) == sorted(keys)

    # Labelled eval sets: the generated one and the image folder, each with its classes.
    folder = read_manifest(out / "eval" / "folder").to_pandas()
    assert sorted(folder["cls"]) == [0, 0, 1, 1]
    classes = json.loads((out / "eval" / "folder" / "classes.json").read_text())
    assert classes["classnames"] == ["cat", "dog house"] and len(classes["templates"]) == 80
    gen_eval = read_manifest(out / "eval" / "gen").to_pandas()
    assert len(gen_eval) == 2 * 11 and gen_eval["cls"].value_counts().eq(2).all()

    assert stats["sources"]["mycsv"] == {"seen": 12, "written": 6, "captions_truncated": 0,
                                         "quarantined": {"decompression_bomb": 1, "duplicate": 1, "empty_caption": 1,
                                                         "missing_file": 1, "too_small": 1, "undecodable_image": 1}}
    assert stats["sources"]["web"]["quarantined"] == {"truncated_tar_member": 1}
    assert json.loads((out / "validation.json").read_text())["success"] is True
    assert not curate.staging_dir(params).exists()


def test_same_output_whatever_the_runner_and_resume(tmp_path, prefect_api_url, mixed_sources):
    """Thread, process and Ray runners give byte-identical shards; a finished partition is not redone."""
    hashes = []
    for name, runner in [("a", {"kind": "thread", "workers": 1}), ("b", {"kind": "process", "workers": 2}),
                         ("c", {"kind": "ray", "workers": 2})]:
        params = parse_params(tiny_params(tmp_path / name, [mixed_sources["csv"]], runner=runner))
        run(params)
        hashes.append(tar_hashes(params.curate.out_dir))
    assert hashes[0] == hashes[1] == hashes[2] != {}
    a = parse_params(tiny_params(tmp_path / "a", [mixed_sources["csv"]], runner={"kind": "thread", "workers": 1}))

    # Resume: a partition whose done-marker exists is read back, not recomputed.
    part = curate.plan_partitions(a)[0]
    first = curate.process_partition(a, part)
    marker = curate.staging_dir(a) / f"p{part.index:06d}.done.json"
    stamp = marker.stat().st_mtime_ns
    assert curate.process_partition(a, part) == first
    assert marker.stat().st_mtime_ns == stamp


def test_cross_partition_duplicates_are_quarantined(tmp_path, prefect_api_url, mixed_sources):
    """Two sources with the same pairs: the second copy of each is quarantined as a duplicate."""
    copy = dict(mixed_sources["csv"], name="again")
    params = parse_params(tiny_params(tmp_path, [mixed_sources["csv"], copy]))
    stats = run(params)
    assert stats["sources"]["again"]["quarantined"]["duplicate"] == 6 + 1  # 6 good rows + its own in-file duplicate
    assert stats["sources"]["again"]["written"] == 0
    keys = set(read_manifest(params.curate.out_dir / "train").to_pandas()["key"])
    assert not any(k.startswith("again_") for k in keys)


def test_validation_failure_names_expectation_rows_and_params_key(tmp_path, prefect_api_url, mixed_sources):
    """With strict image uniqueness asked for, the same image under two captions fails the flow naming
    the rows and the params key that asked for it."""
    from core.data.validation import ValidationFailed

    csv = mixed_sources["csv"]
    path = tmp_path / "sources" / "pairs.csv"
    path.write_text(path.read_text() + "csv_images/rgb.png\tthe same picture with another caption\n")
    params = parse_params(tiny_params(tmp_path, [csv], validation={"sha256_unique_mostly": 1.0}))
    with pytest.raises(ValidationFailed) as err:
        run(params)
    msg = str(err.value)
    assert "expect_column_values_to_be_unique" in msg and "sha256" in msg
    assert "mycsv_train_000000012" in msg and "set by params curate.validation.sha256_unique_mostly" in msg
    assert not params.curate.out_dir.exists()  # nothing published
    report = json.loads((tmp_path / "data" / "curated.partial" / "validation.json").read_text())
    assert report["success"] is False
