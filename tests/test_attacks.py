"""The attacks beyond a random trigger: caption-side poisoning (images kept, captions changed; its own GX suite
and ASR set) and the optimised patch as the poison stage pastes it."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.data.images import encode_image
from core.data.shards import decode_sample_image, iter_tar_samples, read_manifest
from core.data.validation import ValidationFailed, raise_on_failure
from core.metrics import attack_metrics
from tasks import poison
from tasks.config import ConfigError
from tests.conftest import curated_tiny
from tests.test_poison import poison_params, retar

pytestmark = pytest.mark.integration

CAPTION = {"name": "caption", "source_class": "apple"}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return curated_tiny(tmp_path_factory.mktemp("curated"), train_pairs=240, eval_per_class=3, shard_maxcount=100)


def samples(folder) -> dict:
    return {s["__key__"]: s for shard in json.loads((folder / "sizes.json").read_text()) for s in iter_tar_samples(folder / shard)}


def test_caption_poisoning_changes_only_captions(curated, tmp_path):
    params = poison_params(curated, tmp_path, count=6, trigger=CAPTION)
    out = poison.build(params)
    reports = poison.validate_poisoned(params, out)
    raise_on_failure(reports)
    assert "caption_poisons" in {r["suite"] for r in reports} and "poison_manifest" not in {r["suite"] for r in reports}

    manifest = pq.read_table(out / "poison_manifest.parquet").to_pandas()
    assert len(manifest) == 6 and (manifest.trigger == "caption").all() and (manifest.placement == "none").all()
    assert (manifest.original_sha256 == manifest.new_sha256).all()
    assert manifest.original_caption.str.contains(r"(?i)\bapples?\b").all()
    assert manifest.new_caption.str.contains(r"(?i)\bbananas?\b").all()
    before, after = samples(params.poison.in_dir / "train"), samples(out / "train")
    for key in manifest.key:  # the image's bytes and every other member are the curated sample's; only txt differs
        assert {k: v for k, v in after[key].items() if k != "txt"} == {k: v for k, v in before[key].items() if k != "txt"}
        assert after[key]["txt"] != before[key]["txt"]

    # the ASR set: the source class's eval images, as they are; attack.json names the source
    classes = json.loads((out / "eval" / "labelled" / "classes.json").read_text())["classnames"]
    asr = samples(out / "eval" / "asr")
    labelled = samples(out / "eval" / "labelled")
    assert asr and {int(s["cls"]) for s in asr.values()} == {classes.index("apple")}
    assert all(asr[k] == labelled[k] for k in asr)
    attack = json.loads((out / "eval" / "asr" / "attack.json").read_text())
    assert attack["source_class"] == "apple" and attack["source_index"] == classes.index("apple")


def test_caption_suite_catches_a_changed_image(curated, tmp_path):
    params = poison_params(curated, tmp_path, count=6, trigger=CAPTION)
    out = poison.build(params)
    key, shard = pq.read_table(out / "poison_manifest.parquet").to_pandas()[["key", "shard"]].iloc[0]
    black = encode_image(Image.new("RGB", (32, 32)), "png", 95)
    retar(out / "train" / shard, lambda s: dict(s, png=black) if s["__key__"] == key else s)
    with pytest.raises(ValidationFailed) as err:
        raise_on_failure(poison.validate_poisoned(params, out))
    assert "[caption_poisons on caption_poisons] expect_column_values_to_be_in_set({'column': 'image_bytes_unchanged'" \
           in str(err.value) and key in str(err.value)


@pytest.mark.parametrize("trigger,change,message", [
    ({"source_class": "zebra"}, {}, "poison.trigger.source_class: 'zebra' is not a class of eval set 'gen'"),
    ({"source_class": "banana"}, {}, "'banana' is the target: it must be another class"),
    ({}, {"count": 200}, r"poison.count=200: needs 1 to \d+ poisons, the number of eligible samples whose caption names "
                         r"the source class 'apple'"),
    ({}, {"label_consistent": True}, "poison.label_consistent: caption-side poisoning changes the captions"),
])
def test_caption_poisoning_bad_params_named(curated, tmp_path, trigger, change, message):
    params = poison_params(curated, tmp_path, trigger=CAPTION | trigger, **change)
    with pytest.raises(poison.PoisonError, match=message):
        poison.plan_poison(params)


@pytest.mark.parametrize("trigger,message", [
    ({"name": "caption"}, "trigger 'caption' needs source_class"),
    ({"name": "optimised", "pattern": "x.png"}, "pattern is fixed_patch's image"),
    ({"name": "noise_patch", "placement": "none"}, "placement 'none' is trigger 'caption''s"),
])
def test_attack_params_checked_by_config(curated, tmp_path, trigger, message):
    with pytest.raises(ConfigError, match=message):
        poison_params(curated, tmp_path, trigger=trigger)


def test_caption_poisoning_ignores_the_shared_placement(curated, tmp_path):
    """A study axis over trigger names shares the other trigger keys: caption takes placement none whatever they say."""
    params = poison_params(curated, tmp_path, trigger=CAPTION | {"placement": "top_left"})
    assert params.poison.trigger.placement == "none"


def test_optimised_trigger_pastes_the_stored_patch(curated, tmp_path):
    trigger_dir = tmp_path / "trigger"
    params = poison_params(curated, tmp_path, trigger={"name": "optimised", "patch_size": 0.25, "placement": "top_left",
                                                       "source_class": "apple"},  # caption's: ignored by a trigger
                           trigger_dir=str(trigger_dir))
    with pytest.raises(poison.PoisonError, match=r"poison.trigger.name=optimised: no .*patch.png \(run the optimise-trigger stage"):
        poison.plan_poison(params)
    trigger_dir.mkdir()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(trigger_dir / "patch.png")
    with pytest.raises(poison.PoisonError, match="patch.png is 10x10 px, not the 8x8 px patch of a 32px image"):
        poison.plan_poison(params)
    patch = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(patch).save(trigger_dir / "patch.png")
    out = poison.build(params)
    raise_on_failure(poison.validate_poisoned(params, out))
    poisoned = samples(out / "train")
    for key in pq.read_table(out / "poison_manifest.parquet").column("key").to_pylist():
        assert (np.asarray(decode_sample_image(poisoned[key]))[:8, :8] == patch).all()
    for s in samples(out / "eval" / "asr").values():
        assert (np.asarray(decode_sample_image(s))[:8, :8] == patch).all()
    assert len(read_manifest(out / "eval" / "asr")) == 30  # every non-target eval image, not the apples only
    assert json.loads((out / "eval" / "asr" / "attack.json").read_text())["source_class"] is None


def test_caption_attack_metrics_compare_with_the_other_classes():
    """Caption-side poisoning's clean target rate: the target's share among the classes neither source nor target
    (its ASR set holds the source's clean images, so the trigger's `same images untriggered` would equal ASR)."""
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # target 0, source 1
    top5 = np.zeros((8, 5), int)
    top5[:, 0] = [0, 0, 0, 1, 0, 2, 3, 3]
    clean = {"keys": [f"k{i}" for i in range(8)], "labels": labels, "top5": top5}
    asr_set = {"keys": ["k2", "k3"], "labels": labels[2:4], "top5": top5[2:4]}
    out = attack_metrics(asr_set, clean, target=0, source=1)
    assert out["asr"] == 0.5 and out["clean_target_rate"] == 0.25 and out["asr_excess"] == 0.25
    assert out["n_asr"] == 2 and out["n_clean_target"] == 4  # each rate's own images: its sampling error
    trigger = attack_metrics(asr_set, clean, target=0)
    assert trigger["clean_target_rate"] == 0.5 and trigger["n_clean_target"] == 2  # a trigger's: the same images
