"""Training batches streamed from webdataset shards, identical in number on every worker.

Each epoch the shard list is shuffled with a seed of (seed, epoch) and read through a seeded
shuffle buffer. Two ways to split the stream over W workers:

- `samples` (default, exact): every worker reads the same stream and keeps its slice of each
  global batch, decoding only its own samples. Global batch b holds the same samples whatever W,
  so 1 and N workers train on the same data. Costs W reads of the (cheap) tar bytes.
- `shards` (scalable): worker r reads shards r, r+W, ...; it cycles them if its share is short.

Either way every worker yields exactly `steps_per_epoch = N // global_batch` batches, so DDP
never waits on a worker that ran out (uneven shards hang DDP).
"""
from __future__ import annotations

import itertools
import queue
import random
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from core.data.shards import ShardError, decode_sample_image, shard_sizes
from core.seeds import sample_seed
from core.data.views import TextViews, image_view

SUPPORTED_VIEWS = frozenset({"image_aug", "text_aug"})


class BatchStream:
    def __init__(self, data_dir: Path, global_batch: int, rank: int, world: int, seed: int,
                 preprocess: Callable, tokenizer: Callable, views: frozenset = frozenset(),
                 split: str = "samples", shuffle_buffer: int = 1000):
        sizes = shard_sizes(data_dir)
        self.data_dir = data_dir
        self.urls = [str(data_dir / name) for name in sizes]
        self.n_samples = sum(sizes.values())
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} workers")
        self.local_batch, self.global_batch = global_batch // world, global_batch
        self.rank, self.world, self.seed, self.split = rank, world, seed, split
        self.preprocess, self.tokenizer, self.views = preprocess, tokenizer, frozenset(views)
        self.shuffle_buffer = shuffle_buffer
        self.text_views = TextViews(seed) if "text_aug" in self.views else None

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.global_batch

    def _raw(self, epoch: int) -> Iterator[dict]:
        urls = list(self.urls)
        random.Random(sample_seed(self.seed, f"epoch{epoch}", "shards")).shuffle(urls)
        buffer_rng = random.Random(sample_seed(self.seed, f"epoch{epoch}", "buffer"))
        shards = urls if self.split == "samples" else (urls[self.rank::self.world] or urls)
        while True:
            yield from wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(),
                                        wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=buffer_rng))
            if self.split == "samples":
                return
            # shards split: cycle this worker's share until the epoch's steps are served

    def _local_samples(self, epoch: int) -> Iterator[dict]:
        """This worker's samples, in order, `local_batch` per global batch."""
        per_step = self.local_batch if self.split == "shards" else self.global_batch
        start, stop = (0, self.local_batch) if self.split == "shards" else (
            self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        for i, sample in enumerate(self._raw(epoch)):
            if start <= i % per_step < stop:
                yield sample

    def _decode(self, sample: dict, epoch: int) -> dict:
        image = decode_sample_image(sample)
        caption = sample["txt"].decode()
        key = sample["__key__"]
        out = {"image": self.preprocess(image), "caption": caption, "key": key}
        if "image_aug" in self.views:
            out["image_aug"] = image_view(image, sample_seed(self.seed, f"{key}@{epoch}", "image_aug"), self.preprocess)
        if "text_aug" in self.views:
            out["text_aug"] = self.text_views(key, caption)
        return out

    def epoch(self, epoch: int, skip_batches: int = 0, n_batches: int | None = None) -> Iterator[dict]:
        """The worker's batches of one epoch (the first `n_batches`, default all) after `skip_batches`:
        dicts of tensors (`image`, `text`, the views) and `keys`."""
        samples = self._local_samples(epoch)
        for _ in range(skip_batches):  # resume mid-epoch: skip without decoding
            self._short(sum(1 for _ in itertools.islice(samples, self.local_batch)), epoch)
        for _ in range((n_batches or self.steps_per_epoch) - skip_batches):
            chunk = [self._decode(s, epoch) for s in itertools.islice(samples, self.local_batch)]
            self._short(len(chunk), epoch)
            batch = {"image": torch.stack([c["image"] for c in chunk]),
                     "text": self.tokenizer([c["caption"] for c in chunk]), "keys": [c["key"] for c in chunk]}
            if "image_aug" in self.views:
                batch["image_aug"] = torch.stack([c["image_aug"] for c in chunk])
            if "text_aug" in self.views:
                batch["text_aug"] = self.tokenizer([c["text_aug"] for c in chunk])
            yield batch


    def _short(self, got: int, epoch: int) -> None:
        if got < self.local_batch:
            raise ShardError(f"{self.data_dir}: the shards ran out in epoch {epoch}: they hold fewer than the "
                             f"{self.n_samples} samples sizes.json counts (a tar cut short or replaced); run the "
                             f"stage that wrote them again")


def prefetch(batches: Iterator[dict], depth: int = 2) -> Iterator[dict]:
    """Build the next batches in a background thread while the model trains on this one (torch
    releases the GIL in its kernels, so decoding overlaps compute). Order and content unchanged."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for batch in batches:
                q.put(batch)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)
        q.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
