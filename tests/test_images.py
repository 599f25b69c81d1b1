import numpy as np
import pytest
from PIL import Image

from core.data.images import Rejected, normalise_caption, decode_image, encode_image, resize, to_rgb
from tests.conftest import png_bytes, random_image


def halves(w, h):
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_center_crop_keeps_aspect_and_crops():
    out = np.asarray(resize(halves(64, 32), 16, "center_crop"))
    assert out.shape == (16, 16, 3)
    assert out[:, 0, 0].min() > 200 and out[:, -1, 2].min() > 200  # still red left, blue right


def test_border_pads_black():
    out = np.asarray(resize(halves(64, 32), 16, "border"))
    assert out.shape == (16, 16, 3)
    assert out[0].max() == 0 and out[-1].max() == 0  # black bars above and below
    assert out[8, 0, 0] > 200


def test_squash_fills_without_padding():
    out = np.asarray(resize(halves(64, 32), 16, "squash"))
    assert out[0, 0, 0] > 200 and out[0, -1, 2] > 200


def test_resize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="center_crop, border or squash"):
        resize(halves(8, 4), 4, "zoom")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode):
    assert to_rgb(random_image(0).convert(mode) if mode not in ("I;16", "F") else Image.new(mode, (8, 8))).mode == "RGB"


def test_alpha_is_composited_on_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_scaled_to_eight():
    im = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(to_rgb(im)).min() == 255


def test_decode_errors_have_reasons():
    with pytest.raises(Rejected) as e:
        decode_image(b"not an image", 10**6)
    assert e.value.reason == "undecodable_image"
    truncated = png_bytes(random_image(1, (64, 64)))[:200]
    with pytest.raises(Rejected) as e:
        decode_image(truncated, 10**6)
    assert e.value.reason == "undecodable_image"
    with pytest.raises(Rejected) as e:
        decode_image(png_bytes(random_image(1, (64, 64))), 1000)
    assert e.value.reason == "decompression_bomb"


def test_encode_is_deterministic_and_lossless_for_png():
    im = random_image(3, (16, 16))
    a, b = encode_image(im, "png", 95), encode_image(im, "png", 95)
    assert a == b
    assert decode_image(a, 10**6).tobytes() == im.tobytes()
    assert decode_image(encode_image(im, "jpg", 90), 10**6).size == (16, 16)
    assert decode_image(encode_image(im, "webp", 90), 10**6).size == (16, 16)


def test_clean_caption():
    assert normalise_caption("  a   red\tbanana \n", 3, 100) == ("a red banana", False)
    assert normalise_caption("cafÃ© au lait", 3, 100) == ("café au lait", False)  # mojibake fixed by ftfy
    assert normalise_caption("one two three four", 3, 10) == ("one two", True)
    for bad, reason in [("", "empty_caption"), ("   ", "empty_caption"), (None, "empty_caption"), ("ab", "caption_too_short")]:
        with pytest.raises(Rejected) as e:
            normalise_caption(bad, 3, 100)
        assert e.value.reason == reason
