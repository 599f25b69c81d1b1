"""Image and caption normalisation: decode to RGB, resize, re-encode; clean captions."""
from __future__ import annotations

import io
import re
import warnings

import ftfy
import numpy as np
from PIL import Image, ImageOps

ENCODE_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
LOSSY = frozenset({"jpg", "webp"})  # re-encoding changes pixels beyond what was edited
ORIENTATION = 0x0112  # the EXIF tag; 1 is upright


class Rejected(Exception):
    """A sample that cannot be curated; `reason` is the quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes to a fully loaded RGB image, upright (EXIF orientation applied, as a viewer
    shows it: Pillow's `ImageOps.exif_transpose`), or raise Rejected."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise Rejected("decompression_bomb", f"{im.width}x{im.height} > {max_pixels} pixels")
                im.load()
                return to_rgb(_upright(im))
        except Rejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Rejected("decompression_bomb", str(err)) from None
        except Exception as err:  # PIL raises many types for broken or non-image data
            raise Rejected("undecodable_image", f"{type(err).__name__}: {err}") from None


def _upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (Pillow's exif_transpose);
    unreadable EXIF leaves it as stored rather than rejecting a decodable image."""
    try:
        turned = im.getexif().get(ORIENTATION, 1) not in (1, None)
    except Exception:  # Pillow raises several types for malformed EXIF blocks
        return im
    return ImageOps.exif_transpose(im) if turned else im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: palette and alpha composited on white; 16-bit, 32-bit and float scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max(initial=0)
        top = 1.0 if im.mode == "F" and peak <= 1 else 65535.0 if peak > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def resize(im: Image.Image, side: int, mode: str) -> Image.Image:
    """Square `side` x `side`: center_crop (scale the short side, crop), border (fit, pad black), squash."""
    if im.size == (side, side):
        return im
    if mode == "center_crop":
        return ImageOps.fit(im, (side, side), Image.Resampling.BICUBIC)
    if mode == "border":
        return ImageOps.pad(im, (side, side), Image.Resampling.BICUBIC, color=(0, 0, 0))
    if mode == "squash":
        return im.resize((side, side), Image.Resampling.BICUBIC)
    raise ValueError(f"resize mode must be center_crop, border or squash, got {mode!r}")


def encode_image(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG", compress_level=1)
    else:
        im.save(buf, ENCODE_FORMAT[fmt], quality=quality)
    return buf.getvalue()


_SPACE = re.compile(r"\s+")


def normalise_caption(text: str | None, min_chars: int, max_chars: int) -> tuple[str, bool]:
    """ftfy-fixed, whitespace-collapsed caption and whether it was truncated; Rejected if too short.

    Captions over max_chars are cut at the last word boundary (web captions run long; the
    tokenizer truncates anyway), captions under min_chars after cleaning are rejected.
    """
    if text is None:
        raise Rejected("empty_caption", "no caption (no txt member, or a CSV row short of columns)")
    if not text.isascii() or "&" in text:  # ftfy fixes mojibake and HTML entities; plain ASCII has neither
        text = ftfy.fix_text(text)
    text = _SPACE.sub(" ", text).strip()
    if not text:
        raise Rejected("empty_caption")
    if len(text) < min_chars:
        raise Rejected("caption_too_short", f"{len(text)} < {min_chars} chars")
    if len(text) <= max_chars:
        return text, False
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else cut).rstrip(), True
