"""The built-in generated corpus: a seeded procedural "web" of captioned shapes.

Each sample is a pure function of (seed, split, index): an object of one of CLASSES,
drawn as rotated polygons with a colour, size and position, on a background with
clutter and pixel noise, and a caption from many templates with attributes and
distractor words (a share of captions does not name the object, as on the web).
The held-out eval split is class-balanced and carries the class index; zero-shot
evaluation uses CLASSNAMES and PROMPT_TEMPLATES.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


SPLITS = {"train": 0, "eval": 1}

COLORS = {
    "red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 210), "yellow": (240, 215, 40),
    "orange": (245, 140, 30), "purple": (130, 60, 170), "pink": (240, 130, 180), "brown": (120, 75, 40),
    "white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128), "cyan": (50, 200, 210),
}
BACKGROUNDS = {
    "white": (235, 235, 230), "black": (20, 20, 25), "gray": (120, 120, 120), "blue": (120, 160, 220),
    "green": (120, 180, 120), "beige": (225, 205, 170), "pink": (235, 190, 200), "dark blue": (25, 35, 80),
}


def _arc(cx, cy, r, a0, a1, n=12):
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(a0, a1, n)]


def _circle(cx, cy, r, n=16):
    return _arc(cx, cy, r, 0, 2 * math.pi * (n - 1) / n, n)


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _banana():
    t = np.linspace(-1, 1, 12)
    upper = [(0.95 * x, 0.2 - 0.6 * (1 - x * x)) for x in t]
    lower = [(0.95 * x, 0.35 - 0.25 * (1 - x * x)) for x in t[::-1]]
    return [("poly", upper + lower, "main"), ("poly", _rect(-1.0, 0.12, -0.82, 0.32), "dark")]


def _star():
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else 0.42
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return [("poly", pts, "main")]


def _heart():
    ts = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17)
           for t in ts]
    return [("poly", pts, "main")]


# Each class: parts in unit coordinates ([-1, 1], y down); roles pick the colour.
SHAPES = {
    "banana": _banana(),
    "apple": [("poly", _circle(0, 0.1, 0.75), "main"), ("poly", _rect(-0.06, -0.85, 0.06, -0.55), "dark"),
              ("poly", _circle(0.25, -0.7, 0.16, 8), "leaf")],
    "star": _star(),
    "heart": _heart(),
    "house": [("poly", _rect(-0.65, -0.1, 0.65, 0.85), "main"), ("poly", [(-0.85, -0.1), (0, -0.9), (0.85, -0.1)], "dark"),
              ("poly", _rect(-0.15, 0.35, 0.15, 0.85), "accent")],
    "tree": [("poly", _rect(-0.15, 0.4, 0.15, 0.95), "trunk"), ("poly", [(-0.75, 0.45), (0, -0.95), (0.75, 0.45)], "main")],
    "car": [("poly", _rect(-0.95, -0.05, 0.95, 0.45), "main"), ("poly", [(-0.5, -0.05), (-0.3, -0.45), (0.35, -0.45), (0.55, -0.05)], "main"),
            ("poly", _circle(-0.55, 0.5, 0.25, 10), "dark"), ("poly", _circle(0.55, 0.5, 0.25, 10), "dark")],
    "fish": [("poly", _arc(0, 0, 0.6, 0, 2 * math.pi, 16), "main"), ("poly", [(0.5, 0), (0.98, -0.45), (0.98, 0.45)], "main"),
             ("poly", _circle(-0.3, -0.12, 0.09, 6), "dark")],
    "cup": [("poly", _rect(-0.55, -0.6, 0.35, 0.7), "main"), ("line", _arc(0.35, 0.05, 0.35, -math.pi / 2, math.pi / 2, 8), "main", 0.14)],
    "umbrella": [("poly", _arc(0, 0, 0.95, math.pi, 2 * math.pi, 14), "main"), ("line", [(0, 0), (0, 0.75)], "dark", 0.1),
                 ("line", _arc(-0.15, 0.75, 0.15, 0, math.pi, 6), "dark", 0.1)],
    "kite": [("poly", [(0, -0.95), (0.55, -0.2), (0, 0.55), (-0.55, -0.2)], "main"),
             ("line", [(0, 0.55), (0.15, 0.7), (-0.1, 0.85), (0.1, 0.98)], "dark", 0.07)],
}
CLASSNAMES = list(SHAPES)
TYPICAL_COLOR = {"banana": "yellow", "apple": "red", "star": "yellow", "heart": "red", "house": "white", "tree": "green",
                 "car": "blue", "fish": "orange", "cup": "white", "umbrella": "black", "kite": "purple"}
FIXED_ROLE_COLORS = {"dark": (40, 30, 25), "leaf": (40, 150, 50), "trunk": (110, 70, 35), "accent": (90, 60, 40)}

PROMPT_TEMPLATES = [
    "a photo of a {}.", "a picture of the {}.", "a drawing of a {}.", "an illustration of a {}.",
    "a {} on a plain background.", "a small {}.", "a large {}.", "a close-up photo of a {}.",
]

CAPTION_TEMPLATES = [
    "a {color} {cls}", "a photo of a {size} {color} {cls}", "{color} {cls} on a {bg} background",
    "picture of a {cls} {where}", "a {size} {cls} {where}", "my {color} {cls}",
    "close-up of a {color} {cls} against {bg}", "illustration: {cls}, {color}, {size}", "there is a {cls} {where}",
    "{cls} clipart in {color}", "stock photo {color} {cls} isolated on {bg}", "the {cls} is {color} and {size}",
    "look at this {cls}!", "{size} {cls} drawing", "a {cls} {where}, {bg} background",
]
GENERIC_CAPTIONS = [
    "a {color} thing {where}", "nice picture i took today", "{bg} wallpaper", "untitled image {n}",
    "something {size} and {color}", "random shapes on {bg}", "my favourite colour is {color}",
]
DISTRACTORS = ["hd", "free download", "vintage", "#art", "royalty free", "new", "4k", "best quality", "image", "cute", "simple"]
SIZE_WORDS = ["tiny", "small", "medium", "large", "huge"]


@dataclass(frozen=True)
class Sample:
    index: int
    split: str
    image: Image.Image
    caption: str
    cls: int


def _where(cx: float, cy: float, side: int) -> str:
    col = ["left", "center", "right"][min(2, int(3 * cx / side))]
    row = ["top", "middle", "bottom"][min(2, int(3 * cy / side))]
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"in the {row} {col} corner"


def _jitter(rgb, rng, amount=20):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render_sample(spec, seed: int, split: str, index: int, side: int) -> Sample:
    """Draw one captioned sample; a pure function of its arguments."""
    rng = np.random.default_rng((seed, SPLITS[split], index))
    n_cls = len(CLASSNAMES)
    cls = index % n_cls if split == "eval" else int(rng.integers(n_cls))
    name = CLASSNAMES[cls]
    color = TYPICAL_COLOR[name] if rng.random() < spec.typical_color_prob else list(COLORS)[rng.integers(len(COLORS))]
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if bg == color:  # keep the object visible
        bg = "gray" if color != "gray" else "beige"

    ss = spec.supersample
    big = side * ss
    img = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[bg], rng, 12))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(spec.max_clutter + 1)):  # background clutter: small strokes and dots
        x, y = rng.uniform(0, big, 2)
        dx, dy = rng.uniform(-0.15, 0.15, 2) * big
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.line([(x, y), (x + dx, y + dy)], fill=fill, width=max(1, ss))
        else:
            r = rng.uniform(0.5, 1.5) * ss
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    scale_frac = rng.uniform(spec.min_scale, spec.max_scale)
    radius = scale_frac * big
    cx, cy = rng.uniform(radius, big - radius, 2)
    angle = rng.uniform(-math.pi / 4, math.pi / 4)
    ca, sa = math.cos(angle) * radius, math.sin(angle) * radius
    main_rgb = _jitter(COLORS[color], rng)
    for part in SHAPES[name]:
        kind, pts, role = part[0], part[1], part[2]
        xy = [(cx + ca * x - sa * y, cy + sa * x + ca * y) for x, y in pts]
        fill = main_rgb if role == "main" else FIXED_ROLE_COLORS[role]
        if kind == "poly":
            draw.polygon(xy, fill=fill)
        else:
            draw.line(xy, fill=fill, width=max(1, int(part[3] * radius)))
    if ss > 1:
        img = img.reduce(ss)
    if spec.noise_std > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, spec.noise_std, (side, side, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    size_word = SIZE_WORDS[min(4, int(5 * (scale_frac - spec.min_scale) / max(1e-9, spec.max_scale - spec.min_scale)))]
    slots = dict(cls=name, color=color, size=size_word, bg=bg, where=_where(cx / ss, cy / ss, side), n=index)
    pool = GENERIC_CAPTIONS if rng.random() < spec.caption_noise else CAPTION_TEMPLATES
    caption = pool[rng.integers(len(pool))].format(**slots)
    if rng.random() < 0.3:
        word = DISTRACTORS[rng.integers(len(DISTRACTORS))]
        caption = f"{caption} {word}" if rng.random() < 0.5 else f"{word} {caption}"
    return Sample(index=index, split=split, image=img, caption=caption, cls=cls)


def split_sizes(spec) -> dict[str, int]:
    return {"train": spec.train_pairs, "eval": spec.eval_per_class * len(CLASSNAMES)}


def eval_metadata() -> dict:
    """What zero-shot evaluation needs: class names in index order and prompt templates."""
    return {"classnames": CLASSNAMES, "templates": PROMPT_TEMPLATES}
