import numpy as np
import torch

from tasks.config import GeneratedSource
from core.data.corpus import render_sample
from core.data.views import TextViews, eda, image_view, synonym_source

IMAGE = render_sample(GeneratedSource(kind="generated"), 0, "train", 3, 32).image


def test_image_view_deterministic_per_seed_on_pil_and_tensor():
    a, b, c = (np.asarray(image_view(IMAGE, s)) for s in (5, 5, 6))
    assert np.array_equal(a, b)
    views = {np.asarray(image_view(IMAGE, s)).tobytes() for s in range(20)}
    assert len(views) > 5  # AutoAugment varies with the seed
    t = torch.from_numpy(np.array(IMAGE)).permute(2, 0, 1).contiguous()
    assert torch.equal(image_view(t, 9), image_view(t, 9)) and image_view(t, 9).shape == (3, 32, 32)


def test_image_view_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    image_view(IMAGE, 123)
    assert torch.equal(torch.rand(1), expected)


def test_image_view_applies_base_transform():
    out = image_view(IMAGE, 1, base_transform=lambda im: torch.from_numpy(np.array(im)).float() / 255)
    assert out.dtype == torch.float32 and out.shape == (32, 32, 3)


def test_eda_deterministic_and_varied():
    caption = "a small yellow banana on the left of a blue background"
    assert eda(caption, 1) == eda(caption, 1)
    views = {eda(caption, s) for s in range(40)}
    assert len(views) > 10
    assert any("golden" in v or "little" in v or "mini" in v or "azure" in v for v in views)  # synonyms used
    lengths = {len(v.split()) for v in views}
    assert min(lengths) < 11 < max(lengths)  # deletions and insertions happen


def test_synonym_source_falls_back_to_table():
    name, lookup = synonym_source()
    assert name in ("wordnet", "table")
    assert lookup("yellow")


def test_text_views_cached_per_key():
    views = TextViews(seed=3)
    first = views("k1", "a red apple on a table")
    assert views("k1", "a red apple on a table") == first
    assert views._cache == {"k1": first}
    assert eda("", 0) == ""
