"""The poison stage on tiny curated data: real Prefect flow, manifest, substitution, eval sets,
cleaning subset, validation failures on broken outputs, and bad parameters."""
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.poison import run
from tasks import poison
from tasks.config import ConfigError, parse_params
from core.captions import names_class
from core.data.shards import iter_tar_samples, read_manifest, write_table
from core.data.validation import ValidationFailed, raise_on_failure
from tests.conftest import curated_tiny, tiny_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return curated_tiny(tmp_path_factory.mktemp("curated"), train_pairs=120, eval_per_class=3, shard_maxcount=50)


def poison_params(curated, tmp_path, **poison_cfg):
    raw = json.loads(json.dumps(curated))
    raw["poison"] = {"in_dir": raw["curate"]["out_dir"], "out_dir": str(tmp_path / "poisoned"), "count": 10,
                     "trigger": {"name": "noise_patch", "patch_size": 0.25}, "cleaning": {"size": 20, "poisons": 2},
                     "runner": {"kind": "thread", "workers": 2}} | poison_cfg
    return parse_params(raw)


def hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.tar"))}


def test_poison_flow_end_to_end(curated, tmp_path, prefect_api_url):
    params = poison_params(curated, tmp_path)
    stats = run(params)
    out = params.poison.out_dir
    assert stats["poisons"] == 10 and stats["cleaning"] == 22 and stats["eval_asr"] == 30

    manifest = pq.read_table(out / "poison_manifest.parquet").to_pandas()
    assert len(manifest) == 10 and manifest["key"].is_unique
    assert manifest["new_caption"].str.contains("banana").all()
    assert ((manifest.x1 - manifest.x0) == 8).all() and (manifest.original_sha256 != manifest.new_sha256).all()

    # In place: same shards, same keys in the same order; only the poisoned samples differ.
    curated_dir = params.poison.in_dir / "train"
    poisoned_keys = set(manifest["key"])
    for shard in json.loads((curated_dir / "sizes.json").read_text()):
        before = list(iter_tar_samples(curated_dir / shard))
        after = list(iter_tar_samples(out / "train" / shard))
        assert [s["__key__"] for s in before] == [s["__key__"] for s in after]
        for b, a in zip(before, after):
            assert (b == a) == (b["__key__"] not in poisoned_keys)
    # ...and the training data does not say which are poisoned.
    assert "poison" not in json.dumps(read_manifest(out / "train").schema.names)

    asr = read_manifest(out / "eval" / "asr").to_pandas()
    assert len(asr) == 30 and (asr["cls"] != 0).all()  # banana is class 0
    clean = read_manifest(out / "eval" / "labelled").to_pandas()
    assert len(clean) == 33 and set(asr["key"]) < set(clean["key"])
    assert json.loads((out / "eval" / "asr" / "classes.json").read_text())["classnames"][0] == "banana"

    cleaning = pq.read_table(out / "cleaning_manifest.parquet").to_pandas()
    assert len(cleaning) == 22 and cleaning["poisoned"].sum() == 2
    assert set(cleaning.loc[cleaning.poisoned, "key"]) <= poisoned_keys
    assert not set(cleaning.loc[~cleaning.poisoned, "key"]) & poisoned_keys
    assert json.loads((out / "validation.json").read_text())["success"]


def test_same_bytes_whatever_the_order_of_shards(curated, tmp_path):
    """Shards poisoned in any order (as parallel workers finish) give the same bytes."""
    outs = []
    for order in (list, reversed):
        params = poison_params(curated, tmp_path / order.__name__)
        the_plan = poison.plan_poison(params)
        poison.reset_partial(params)
        records = [poison.poison_shard(params, s, the_plan["poisons"].get(s, {})) for s in order(the_plan["shards"])]
        partial = poison.finalize(params, the_plan, records, poison.write_eval_sets(params, the_plan),
                                  poison.write_cleaning_subset(params, the_plan))
        outs.append(hashes(partial) | {"manifest": hashlib.sha256((partial / "poison_manifest.parquet").read_bytes()).hexdigest()})
    assert outs[0] == outs[1]


def test_rate_and_label_consistent(curated, tmp_path):
    params = poison_params(curated, tmp_path, count=None, rate=0.05)
    assert poison.plan_poison(params)["n_poison"] == 6  # round(0.05 * 120)
    params = poison_params(curated, tmp_path, count=3, label_consistent=True, cleaning={"size": 5, "poisons": 0})
    the_plan = poison.plan_poison(params)
    train = read_manifest(params.poison.in_dir / "train").to_pandas().set_index("key")
    for shard_poisons in the_plan["poisons"].values():
        for key, caption in shard_poisons.items():
            assert caption == train.at[key, "caption"] and "banana" in caption  # caption kept


def test_poison_captions_from_templates_or_corpus(curated, tmp_path):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    train = read_manifest(Path(curated["curate"]["out_dir"]) / "train").to_pandas().set_index("key")
    naming = {c for c in train["caption"] if names_class(c, "banana")}
    templates = {t("banana") for t in OPENAI_IMAGENET_TEMPLATES}
    for source, allowed in (("templates", templates), ("corpus", naming)):
        captions = [c for shard in poison.plan_poison(poison_params(curated, tmp_path, captions=source))["poisons"].values()
                    for c in shard.values()]
        assert len(captions) == 10 and set(captions) <= allowed and len(set(captions)) > 1, source
    assert not naming & templates  # the corpus's own style, not the prompts'


def test_corpus_captions_need_a_caption_naming_the_target(curated, tmp_path):
    with pytest.raises(poison.PoisonError, match="poison.captions='corpus': no training caption names the target 'kite2'"):
        poison.poison_captions(poison_params(curated, tmp_path, captions="corpus", target="kite2").poison,
                               ["a red apple", "a kite"])


def rewrite_parquet(path, edit):
    df = pq.read_table(path).to_pandas()
    write_table(path, pa.Table.from_pandas(edit(df), preserve_index=False))


def retar(path, edit):
    """Rewrite a tar through `edit(sample) -> sample` (raw bytes, no manifest change)."""
    from core.data.shards import TarSampleWriter

    samples = [edit(s) for s in iter_tar_samples(path)]
    with open(path, "wb") as f:
        w = TarSampleWriter(f)
        for s in samples:
            w.write(s)
        w.close()


def first_clean_key(out):
    poisoned = set(pq.read_table(out / "poison_manifest.parquet").column("key").to_pylist())
    return next(k for k in read_manifest(out / "train").column("key").to_pylist() if k not in poisoned)


BREAKAGES = {
    "clean sample changed": (lambda out: retar(out / "train" / "shard-000000.tar", lambda s: dict(s, txt=b"tampered")
                                               if s["__key__"] == first_clean_key(out) else s),
                             "poisoned_train", "unexpected_change"),
    "a poison missing": (lambda out: rewrite_parquet(out / "poison_manifest.parquet", lambda df: df.iloc[1:]),
                         "poison_manifest", "expect_table_row_count_to_be_between"),
    "caption without target": (lambda out: rewrite_parquet(out / "poison_manifest.parquet",
                                                           lambda df: df.assign(new_caption=["an apple"] + list(df.new_caption[1:]))),
                               "poison_manifest", "new_caption"),
    "target image in ASR set": (lambda out: rewrite_parquet(out / "eval" / "asr" / "shard-000000.parquet",
                                                            lambda df: df.assign(cls=[0] + list(df.cls[1:]))),
                                "asr_set", "expect_column_values_to_not_be_in_set"),
    "cleaning label wrong": (lambda out: rewrite_parquet(out / "cleaning_manifest.parquet",
                                                         lambda df: df.assign(poisoned=False)),
                             "cleaning_subset", "poisoned_int"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_validation_catches_broken_outputs(curated, tmp_path, breakage):
    params = poison_params(curated, tmp_path)
    out = poison.build(params)
    raise_on_failure(poison.validate_poisoned(params, out))  # intact: passes
    breaker, suite, fragment = BREAKAGES[breakage]
    breaker(out)
    with pytest.raises(ValidationFailed) as err:
        raise_on_failure(poison.validate_poisoned(params, out))
    assert f"[{suite} on {suite}]" in str(err.value) and fragment in str(err.value)


def test_jpeg_poisons_pass_and_a_misplaced_box_is_still_caught(tmp_path):
    """Re-encoding a JPEG moves pixels everywhere a little; the study's 16/224 patch recorded 32 px off
    its real place is still found (224 px JPEG, the size where it matters)."""
    from tasks import curate

    raw = tiny_params(tmp_path, [], image_size=224, image_format="jpg", quality=90, shard_maxcount=20)
    raw["curate"]["sources"][0] |= {"train_pairs": 20, "eval_per_class": 1}
    curate.run_sequential(parse_params(raw))
    params = poison_params(raw, tmp_path, count=4, trigger={"name": "noise_patch", "patch_size": 16 / 224},
                           cleaning={"size": 4, "poisons": 0})
    out = poison.build(params)
    raise_on_failure(poison.validate_poisoned(params, out))
    rewrite_parquet(out / "poison_manifest.parquet",
                    lambda df: df.assign(x0=(df.x0 + 32) % 192, x1=(df.x0 + 32) % 192 + 16))
    with pytest.raises(ValidationFailed, match=r"'outside_change', 'min_value': 0.0, 'max_value': 0.001}\): 4 offending row") as err:
        raise_on_failure(poison.validate_poisoned(params, out))
    assert "'changed_inside_box', 'value_set': [True]}): 4 offending row" in str(err.value)  # re-encoding is no trigger


def test_validation_catches_a_trigger_outside_its_box(curated, tmp_path):
    params = poison_params(curated, tmp_path, trigger={"name": "yellow", "patch_size": 0.25, "placement": "top_left"})
    out = poison.build(params)
    manifest = pq.read_table(out / "poison_manifest.parquet").to_pandas()
    key, shard = manifest.key[0], manifest.shard[0]
    # Shift the recorded box: the real patch is now outside it.
    rewrite_parquet(out / "poison_manifest.parquet", lambda df: df.assign(x0=df.x0 + 16, x1=df.x1 + 16))
    with pytest.raises(ValidationFailed, match="outside_change") as err:
        raise_on_failure(poison.validate_poisoned(params, out))
    assert key in str(err.value) and shard


@pytest.mark.parametrize("change,message", [
    ({"count": 500}, "poison.count=500: needs 1 to 120 poisons"),
    ({"count": 50, "label_consistent": True}, "label-consistent samples"),
    ({"target": "zebra"}, "poison.target: 'zebra' is not a class of eval set 'gen'"),
    ({"cleaning": {"size": 200}}, "poison.cleaning.size=200: only 110 non-poisoned"),
    ({"cleaning": {"size": 5, "poisons": 11}}, "poison.cleaning.poisons=11: only 10 poisoned"),
    ({"in_dir": "/nonexistent"}, "poison.in_dir: /nonexistent/train holds no curated shards"),
])
def test_bad_params_rejected_before_writing(curated, tmp_path, change, message):
    params = poison_params(curated, tmp_path, **change)
    with pytest.raises(poison.PoisonError, match=message.replace("(", r"\(").replace(")", r"\)")):
        poison.plan_poison(params)
    assert not params.poison.out_dir.exists() and not poison.partial_dir(params).exists()


@pytest.mark.parametrize("change,message", [
    ({"count": 5, "rate": 0.1}, "set exactly one of count and rate"),
    ({"count": None}, "set exactly one of count and rate"),
    ({"count": None, "rate": 1.5}, "poison.rate: Input should be less than 1"),
    ({"trigger": {"name": "laser"}}, "poison.trigger.name"),
    ({"trigger": {"patch_size": 2}}, "poison.trigger.patch_size"),
])
def test_bad_params_rejected_by_config(curated, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        poison_params(curated, tmp_path, **change)
