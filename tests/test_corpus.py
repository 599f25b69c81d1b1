import numpy as np

from core.data import corpus
from tasks.config import GeneratedSource

SPEC = GeneratedSource(kind="generated")


def test_classes_include_the_target_and_are_drawable():
    assert len(corpus.CLASSNAMES) >= 10 and "banana" in corpus.CLASSNAMES
    assert set(corpus.TYPICAL_COLOR) == set(corpus.CLASSNAMES)


def test_samples_are_deterministic_and_differ():
    a = corpus.render_sample(SPEC, 3, "train", 17, 32)
    b = corpus.render_sample(SPEC, 3, "train", 17, 32)
    assert a.caption == b.caption and a.cls == b.cls
    assert a.image.tobytes() == b.image.tobytes()
    c = corpus.render_sample(SPEC, 4, "train", 17, 32)  # another seed
    d = corpus.render_sample(SPEC, 3, "eval", 17, 32)  # another split
    assert a.image.tobytes() != c.image.tobytes() and a.image.tobytes() != d.image.tobytes()


def test_image_size_and_mode_follow_params():
    for side in (16, 32, 64):
        s = corpus.render_sample(SPEC, 0, "train", 0, side)
        assert s.image.size == (side, side) and s.image.mode == "RGB"


def test_eval_split_is_class_balanced():
    classes = [corpus.render_sample(SPEC, 0, "eval", i, 32).cls for i in range(3 * len(corpus.CLASSNAMES))]
    assert np.bincount(classes).tolist() == [3] * len(corpus.CLASSNAMES)


def test_captions_mostly_name_the_object_with_varied_attributes():
    samples = [corpus.render_sample(SPEC, 1, "train", i, 32) for i in range(600)]
    named = np.mean([corpus.CLASSNAMES[s.cls] in s.caption for s in samples])
    assert 0.8 < named < 0.97  # caption_noise=0.1 leaves a share unnamed
    assert len({s.caption for s in samples}) > 300
    assert set(np.bincount([s.cls for s in samples], minlength=11).nonzero()[0]) == set(range(11))
    colors_of_bananas = {c for s in samples if s.cls == 0 for c in corpus.COLORS if f" {c} " in f" {s.caption} "}
    assert len(colors_of_bananas) >= 4  # colour alone does not give the class away


def test_no_caption_noise_always_names_the_object():
    spec = GeneratedSource(kind="generated", caption_noise=0.0)
    assert all(corpus.CLASSNAMES[s.cls] in s.caption
               for s in (corpus.render_sample(spec, 0, "train", i, 32) for i in range(200)))


def test_objects_vary_in_position():
    imgs = np.stack([np.asarray(corpus.render_sample(SPEC, 0, "train", i, 32).image, dtype=float) for i in range(200)])
    assert imgs.std(axis=0).mean() > 30  # no fixed layout
