"""Training batches: the same bytes whatever the number of loader processes; errors named."""
import os
import signal
import threading
import time

import pytest
import torch
from torchvision.transforms import v2

from core.data.loader import BatchStream, SampleCache, resolve_split
from core.data.shards import ShardError
from tests.conftest import png_bytes, random_image, write_shards

PREPROCESS = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])


def tokenize(texts):
    return torch.tensor([[len(t), sum(map(ord, t))] for t in texts])


def kill_on_9px(image):
    """A decoder crash (or the OOM killer) as the loader process sees it: gone without an exception."""
    if image.size == (9, 9):
        os.kill(os.getpid(), signal.SIGKILL)
    return PREPROCESS(image)


def batches(folder, loader_workers, **kw):
    kw = {"global_batch": 4, "rank": 0, "world": 1, "views": frozenset({"image_aug", "text_aug"})} | kw
    stream = BatchStream(folder, seed=3, preprocess=PREPROCESS, tokenizer=tokenize, shuffle_buffer=5,
                         loader_workers=loader_workers, **kw)
    return [list(stream.epoch(e, skip_batches=s)) for e, s in ((0, 0), (1, 2))]


def cached_batches(folder, loader_workers, **kw):
    """`batches` with a cache (used with a thread, set aside with loader processes): epoch 1 from memory."""
    return batches(folder, loader_workers, cache=SampleCache(limit_mb=1), **kw)


def same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and x["keys"] == y["keys"] and all(torch.equal(x[k], y[k]) for k in x if k != "keys")
        for x, y in zip(a, b))


@pytest.mark.parametrize("split_kw", [{}, {"rank": 1, "world": 3, "split": "shards"}],
                         ids=["one-worker", "rank1-of-3-shards"])
def test_batches_are_byte_identical_for_0_1_and_3_loader_processes(tmp_path, split_kw):
    write_shards(tmp_path / "s", n=40, per_shard=8, size=12)
    kw = split_kw | ({"global_batch": 6} if split_kw else {})
    reference = batches(tmp_path / "s", 0, **kw)
    assert [len(e) for e in reference] == ([6, 4] if split_kw else [10, 8])  # epoch 1 resumed after 2 batches
    assert reference[0][0]["image_aug"].shape == reference[0][0]["image"].shape
    assert reference[0][0]["keys"] != reference[1][0]["keys"]  # epochs are shuffled apart
    for workers in (1, 3):
        assert all(same(a, b) for a, b in zip(reference, batches(tmp_path / "s", workers, **kw))), workers
    for workers in (0, 3):  # the cache (thread: epoch 1 from memory; processes: none) changes no byte
        assert all(same(a, b) for a, b in zip(reference, cached_batches(tmp_path / "s", workers, **kw))), workers


def test_a_cache_gives_the_same_batches_and_a_later_epoch_reads_no_tar(tmp_path):
    write_shards(tmp_path / "s", n=40, per_shard=8, size=12)
    reference = batches(tmp_path / "s", 0)
    cache = SampleCache(limit_mb=1)
    stream = BatchStream(tmp_path / "s", 4, 0, 1, seed=3, preprocess=PREPROCESS, tokenizer=tokenize, shuffle_buffer=5,
                         views=frozenset({"image_aug", "text_aug"}), cache=cache)
    first = list(stream.epoch(0))
    assert 0 < cache.used <= 2**20 and len(cache._shards) == 5 and len(cache._images) == 40 and cache._tokens
    for tar in (tmp_path / "s").glob("*.tar"):  # what a second epoch needs is all in memory
        tar.write_bytes(b"")
    assert same(reference[0], first) and same(reference[1], list(stream.epoch(1, skip_batches=2)))


def test_a_cache_too_small_for_a_shard_keeps_none_of_it_and_still_gives_every_sample(tmp_path):
    write_shards(tmp_path / "s", n=40, per_shard=8, size=12)
    cache = SampleCache(limit_mb=1500 / 2**20)  # a few samples' bytes: no whole shard fits
    stream = BatchStream(tmp_path / "s", 4, 0, 1, seed=3, preprocess=PREPROCESS, tokenizer=tokenize, shuffle_buffer=5,
                         views=frozenset({"image_aug", "text_aug"}), cache=cache)
    assert same(batches(tmp_path / "s", 0)[0], list(stream.epoch(0)))
    assert not cache._shards and cache.used <= 1500


def test_a_sample_error_in_a_loader_process_is_raised_as_itself_in_its_turn(tmp_path):
    write_shards(tmp_path / "s", n=16, per_shard=4)
    with (tmp_path / "s" / "shard-000003.tar").open("r+b") as f:  # s012's image header destroyed
        f.seek(512)
        f.write(b"\0" * 16)
    stream = BatchStream(tmp_path / "s", 4, 0, 1, 0, PREPROCESS, tokenize, split="samples", shuffle_buffer=1,
                         loader_workers=2)
    seen = []
    with pytest.raises(ShardError, match=r"shard-000003.tar: sample 's012': its png cannot be decoded "
                                         r"\(UnidentifiedImageError") as err:
        for batch in stream.epoch(0):
            seen += batch["keys"]
    assert "DataLoader worker" not in str(err.value)  # not wrapped in torch's traceback text
    assert "s012" not in seen and len(seen) == 8  # the 2 batches before its own (shards in seeded order)


def test_a_loader_process_that_dies_names_the_shard_and_key(tmp_path):
    write_shards(tmp_path / "s", n=16, per_shard=4, odd={"s006": png_bytes(random_image(6, (9, 9)))})
    stream = BatchStream(tmp_path / "s", 4, 0, 1, 0, kill_on_9px, tokenize, shuffle_buffer=1, loader_workers=2)
    with pytest.raises(ShardError, match=r"/s \(epoch 0\): a loader process died; the last sample it started "
                                         r"decoding: sample 's006' of .*shard-00000\d\.tar .*out of memory"):
        for _ in stream.epoch(0):
            time.sleep(0.5)  # a consumer busy in its own code (a forward pass) when the process dies


class Unpicklable(Exception):
    def __init__(self, lock):
        super().__init__("held a lock")
        self.lock = lock


def raise_unpicklable_on_9px(image):
    if image.size == (9, 9):
        raise Unpicklable(threading.Lock())
    return PREPROCESS(image)


def test_an_error_that_cannot_cross_processes_is_still_raised_not_dropped(tmp_path):
    write_shards(tmp_path / "s", n=16, per_shard=4, odd={"s006": png_bytes(random_image(6, (9, 9)))})
    stream = BatchStream(tmp_path / "s", 4, 0, 1, 0, raise_unpicklable_on_9px, tokenize, shuffle_buffer=1,
                         loader_workers=2)
    with pytest.raises(ShardError, match="Unpicklable in a loader process: held a lock"):
        list(stream.epoch(0))


def test_a_consumer_that_stops_early_stops_the_prefetch_thread(tmp_path):
    def prefetching() -> int:  # counted by name: other tests' threads may end meanwhile
        return sum(t.name == "prefetch" for t in threading.enumerate())

    write_shards(tmp_path / "s", n=40, per_shard=8)
    before = prefetching()
    batches = BatchStream(tmp_path / "s", 4, 0, 1, 0, PREPROCESS, tokenize).epoch(0)
    next(batches)
    assert prefetching() == before + 1
    batches.close()  # a diverged run leaves its epoch
    deadline = time.time() + 60  # the batch being built when the consumer stopped is finished first (a loaded machine)
    while prefetching() > before and time.time() < deadline:
        time.sleep(0.05)
    assert prefetching() == before


def test_more_workers_than_shards(tmp_path):
    write_shards(tmp_path / "s", n=16, per_shard=4)  # 4 shards
    assert [resolve_split("auto", w, 4) for w in (1, 2, 3, 4, 5)] == ["samples"] * 2 + ["shards"] * 2 + ["samples"]
    with pytest.raises(ShardError, match=r"4 shards for 8 workers: the shards split needs a shard per worker"):
        BatchStream(tmp_path / "s", 8, 0, 8, 0, PREPROCESS, tokenize, split="shards")
    streams = [BatchStream(tmp_path / "s", 4, 0, 1, 0, PREPROCESS, tokenize, loader_workers=w) for w in (0, 6)]
    assert same(*[list(s.epoch(0)) for s in streams])  # 6 loader processes for 4 batches: 2 idle
