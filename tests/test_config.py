import pytest
import yaml

from tasks.config import ConfigError, load_params, parse_params
from tests.conftest import REPO, tiny_params, write_params


def check_error(raw, *fragments):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "params.yaml")
    for f in fragments:
        assert f in str(err.value), str(err.value)


def test_repo_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.curate.image_size == 32
    assert params.curate.sources[0].kind == "generated"


def test_unknown_key_is_named(tmp_path):
    raw = tiny_params(tmp_path, [])
    raw["curate"]["imge_size"] = 32
    check_error(raw, "curate.imge_size", "Extra inputs are not permitted")


def test_wrong_type_and_range_are_named(tmp_path):
    raw = tiny_params(tmp_path, [])
    raw["curate"]["image_size"] = "big"
    raw["curate"]["sources"][0]["train_pairs"] = -5
    check_error(raw, "curate.image_size", "valid integer", "'big'",
                "curate.sources.0.generated.train_pairs", "greater than or equal to 1", "-5")


def test_unknown_source_kind_lists_the_known_ones(tmp_path):
    raw = tiny_params(tmp_path, [{"kind": "s3bucket", "name": "x"}])
    check_error(raw, "curate.sources.1", "'generated', 'csv', 'webdataset', 'image_folder'")


def test_bad_enum_names_allowed_values(tmp_path):
    raw = tiny_params(tmp_path, [], resize_mode="stretch")
    check_error(raw, "curate.resize_mode", "'center_crop', 'border' or 'squash'")


def test_duplicate_source_names_and_bad_name(tmp_path):
    raw = tiny_params(tmp_path, [{"kind": "webdataset", "name": "gen", "urls": "x.tar"}])
    check_error(raw, "source names must be unique", "gen")
    raw = tiny_params(tmp_path, [{"kind": "webdataset", "name": "my.data", "urls": "x.tar"}])
    check_error(raw, "curate.sources.1.webdataset.name", "pattern")


def test_cross_field_checks(tmp_path):
    raw = tiny_params(tmp_path, [], caption={"min_chars": 50, "max_chars": 10})
    check_error(raw, "curate.caption", "min_chars (50) must be <= max_chars (10)")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="curate"):  # missing section
        load_params(write_params(tmp_path / "p.yaml", {"seed": 1}))


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and key not in ("weights", "defence_options"):  # maps of free names
            out |= _keys(value, path + ".")
    return out


def test_params_yaml_lists_every_key_at_the_schema_default():
    """One place for defaults: params.yaml spells out every setting (dvc.yaml reads them by key) and
    each equals the schema's default; only the sources and the poison count have none."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    loaded = load_params(REPO / "params.yaml").model_dump(mode="json")
    required = {"curate": {"sources": raw["curate"]["sources"]}, "poison": {"count": raw["poison"]["count"]},
                "pretrain": {}, "detect": {}, "clean": {}, "evaluate": {}}
    assert loaded == parse_params(required).model_dump(mode="json")
    assert _keys(raw) == _keys(loaded)


@pytest.mark.parametrize("change, line", [
    ({"pretrain": {"objectives": ["bogus"]}}, "  pretrain.objectives: Value error, unknown objective 'bogus'; known objectives: ["),
    ({"pretrain": {"weights": {"mmcl_ssl": {"foo": 1.0}}}},
     "  pretrain.weights: Value error, mmcl_ssl: ['foo'] not accepted; mmcl_ssl takes weights {'mmcl': 1.0, 'ssl': 1.0}"),
    ({"clean": {"defence_options": {"nope": {}}}}, "  clean.defence_options: Value error, unknown defence 'nope'"),
    ({"pretrain": {"accum_steps": 3, "num_workers": 2}},
     "  pretrain: Value error, batch_size 64 must be divisible by num_workers x accum_steps (2 x 3)"),
    ({"pretrain": {"baselines": ["mmcl"]}}, "  pretrain.baselines: Extra inputs are not permitted (got ['mmcl']); renamed "
                                            "pretrain.controls"),
    ({"clean": {"target": "banana"}}, "  clean.target: Extra inputs are not permitted (got 'banana'); removed: the target "
                                      "comes with the eval sets"),
])
def test_errors_name_the_key_and_what_became_of_old_keys(change, line):
    """Each bad value is one line under its dotted key; a check across a section's fields says what is
    wrong without dumping the section; keys of earlier versions say what they became."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = {k: v | change[k] if k in change else v for k, v in raw.items()}
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "params.yaml")
    (reported,) = str(err.value).splitlines()[1:]
    assert reported.startswith(line) and len(reported) < 300, reported
