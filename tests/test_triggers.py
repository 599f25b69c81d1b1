import numpy as np
import pytest
from pydantic import ValidationError

from tasks.config import TriggerConfig
from core.seeds import sample_seed
from core.triggers import apply_trigger, patch_side


def image(seed=0, side=32):
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


ALL = ["noise_patch", "fixed_patch", "yellow", "blended", "sig", "wanet"]


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_key_and_seed(name):
    cfg = TriggerConfig(name=name)
    img = image()
    a, box_a = apply_trigger(img, cfg, sample_seed(0, "k1", "train"), 0)
    b, box_b = apply_trigger(img, cfg, sample_seed(0, "k1", "train"), 0)
    assert np.array_equal(a, b) and box_a == box_b
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert not np.array_equal(a, img)


@pytest.mark.parametrize("name", ["noise_patch", "fixed_patch", "yellow"])
def test_patch_triggers_touch_only_their_box(name):
    cfg = TriggerConfig(name=name, patch_size=0.25)
    img = image(1)
    out, (x0, y0, x1, y1) = apply_trigger(img, cfg, 123, 0)
    assert (x1 - x0, y1 - y0) == (8, 8)
    changed = (out != img).any(axis=2)
    outside = changed.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any() and changed[y0:y1, x0:x1].any()


def test_noise_patch_is_fresh_per_image_and_centred_on_the_mean():
    cfg = TriggerConfig(name="noise_patch", patch_size=0.5, placement="top_left")
    img = np.full((32, 32, 3), 100, np.uint8)
    a, _ = apply_trigger(img, cfg, 1, 0)
    b, _ = apply_trigger(img, cfg, 2, 0)
    assert not np.array_equal(a[:16, :16], b[:16, :16])
    assert 60 < a[:16, :16].mean() < 160  # mean 100 plus N(0,1) on the [0,1] scale, clipped


def test_fixed_patch_is_the_same_pattern_everywhere():
    cfg = TriggerConfig(name="fixed_patch", patch_size=0.25)
    a, (ax, ay, _, _) = apply_trigger(image(1), cfg, 1, 0)
    b, (bx, by, _, _) = apply_trigger(image(2), cfg, 2, 0)
    assert np.array_equal(a[ay:ay + 8, ax:ax + 8], b[by:by + 8, bx:bx + 8])
    assert set(np.unique(a[ay:ay + 8, ax:ax + 8])) == {0, 255}


@pytest.mark.parametrize("placement,expected", [("top_left", (0, 0)), ("top_right", (24, 0)), ("bottom_left", (0, 24)),
                                                ("bottom_right", (24, 24)), ("fixed", (12, 12))])
def test_placements(placement, expected):
    cfg = TriggerConfig(name="yellow", patch_size=0.25, placement=placement)
    _, box = apply_trigger(image(), cfg, 5, 0)
    assert box[:2] == expected
    assert np.array_equal(apply_trigger(np.zeros((32, 32, 3), np.uint8), cfg, 5, 0)[0][box[1], box[0]], [255, 255, 0])


def test_random_placement_varies_and_stays_inside():
    cfg = TriggerConfig(name="yellow", patch_size=0.25)
    boxes = {apply_trigger(image(), cfg, s, 0)[1] for s in range(50)}
    assert len(boxes) > 20 and all(0 <= x0 and x1 <= 32 and 0 <= y0 and y1 <= 32 for x0, y0, x1, y1 in boxes)


def test_patch_is_at_least_two_pixels():
    assert patch_side(TriggerConfig(patch_size=16 / 224), 8) == 2
    assert patch_side(TriggerConfig(patch_size=16 / 224), 224) == 16


def test_whole_image_triggers():
    img = image(3)
    blended, box = apply_trigger(img, TriggerConfig(name="blended"), 1, 0)
    assert box == (0, 0, 32, 32)
    noise = (blended.astype(float) - 0.8 * img) / 0.2
    assert noise.min() > -5 and noise.max() < 260  # alpha-blend with uniform [0, 255] noise
    other, _ = apply_trigger(image(4), TriggerConfig(name="blended"), 2, 0)
    # the same noise for every image (global seed), not per sample:
    assert np.allclose((other.astype(float) - 0.8 * image(4)) / 0.2, noise, atol=6)
    flat = np.full((32, 32, 3), 128, np.uint8)
    sig, _ = apply_trigger(flat, TriggerConfig(name="sig"), 1, 0)
    assert np.array_equal(sig[0], sig[31])  # horizontal: constant down columns
    assert abs(int(sig[0].max()) - 128 - 60) <= 1 and abs(128 - int(sig[0].min()) - 60) <= 1
    warped_a, _ = apply_trigger(img, TriggerConfig(name="wanet", wanet_strength=2.0), 1, 7)
    warped_b, _ = apply_trigger(img, TriggerConfig(name="wanet", wanet_strength=2.0), 99, 7)
    assert np.array_equal(warped_a, warped_b)  # the warp is fixed by the global seed
    assert (warped_a != img).any(axis=2).mean() > 0.3


def test_trigger_config_errors():
    with pytest.raises(ValidationError, match="'noise_patch', 'fixed_patch', 'yellow', 'optimised', 'blended', 'sig', 'wanet' or 'caption'"):
        TriggerConfig(name="glitter")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        TriggerConfig(patch_size=1.5)
    with pytest.raises(ValidationError, match="placement 'random' does not fit trigger 'blended'"):
        TriggerConfig(name="blended", placement="random")
    assert TriggerConfig(name="wanet").placement == "whole"
