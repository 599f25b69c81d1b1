"""Training batches streamed from webdataset shards, identical in number on every worker.

Each epoch the shard list is shuffled with a seed of (seed, epoch) and read through a seeded
shuffle buffer. Two ways to split the stream over W training workers:

- `samples` (exact): every worker reads the same stream and keeps its slice of each global batch,
  decoding only its own samples. Global batch b holds the same samples whatever W, so 1 and N
  workers train on the same data. Costs W reads of the (cheap) tar bytes.
- `shards` (scalable): worker r reads shards r, r+W, ...; it cycles them if its share is short.
- `auto` (default): `samples` up to 2 workers, `shards` above when there are enough shards.

Either way every worker yields exactly `steps_per_epoch = N // global_batch` batches, so DDP
never waits on a worker that ran out (uneven shards hang DDP).

Decoding, preprocessing and the augmented views run in `loader_workers` processes per training
worker (`parallel`, a torch DataLoader): loader process p of P reads the worker's stream and decodes
only batches p, p+P, ...; the DataLoader takes one batch from each process in turn, so the batches,
their order and their bytes do not depend on P. With 0 they are built in a thread of the trainer.
"""
from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os
import queue
import random
import pickle
import re
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from core.data.shards import ShardError, decode_sample_image, shard_sizes
from core.seeds import sample_seed
from core.data.views import TextViews, image_view

SUPPORTED_VIEWS = frozenset({"image_aug", "text_aug"})
_SLOT = 512  # bytes per loader process for "pid<TAB>shard<TAB>key" of the sample it decodes


def resolve_split(split: str, world: int, n_shards: int) -> str:
    """The split `auto` stands for: `shards` above 2 workers when every worker has a shard of its own."""
    if split != "auto":
        return split
    return "shards" if world > 2 and n_shards >= world else "samples"


class SampleCache:
    """Shard samples, their preprocessed images and their captions' tokens kept in memory between passes,
    up to `limit_mb` MiB (0: none): a later epoch, or the cleaning stage's next evaluation, parses no tar,
    decodes no image and tokenizes no caption. The generated corpus' 10k 32 px pairs take 30 MiB of bytes
    and 120 MiB of float images; parsing tars (Python's tarfile) was half the loader's time there,
    decoding and preprocessing a third. What does not fit is read and decoded each pass, as without a
    cache; a shard is kept whole or not at all, and the samples come in the same order either way. For
    decoding in the reader's own process (a thread): loader processes are forked afresh each epoch and
    would fill copies that are thrown away, so BatchStream and `predict` use none with them. One cache per
    `preprocess` and tokenizer; what it holds is shared, never modified."""

    def __init__(self, limit_mb: float = 0):
        self.limit, self.used = int(limit_mb * 2**20), 0
        self._shards: dict[str, list[dict]] = {}
        self._images: dict[tuple[str, str], tuple] = {}
        self._tokens: dict[str, torch.Tensor] = {}

    def _fits(self, size: int) -> bool:
        return self.used + size <= self.limit

    def samples(self, urls: list[str]) -> Iterator[dict]:
        """The webdataset samples (dicts of bytes with `__key__` and `__url__`) of the tars `urls`, in order."""
        for url in urls:
            if url in self._shards:
                yield from self._shards[url]
                continue
            kept, size = [], 0
            for sample in wds.tarfile_to_samples()([{"url": url}]):
                if kept is not None:
                    size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
                    if self._fits(size):
                        kept.append(sample)
                    else:  # kept whole or not at all
                        kept = None
                yield sample
            if kept is not None and self._fits(size):  # images cached meanwhile count too
                self._shards[url], self.used = kept, self.used + size

    def image(self, sample: dict, preprocess: Callable, keep_decoded: bool = False) -> tuple:
        """(`preprocess` of the sample's image, a [3, H, W] tensor; the decoded PIL image when `keep_decoded`,
        else None). Only tensors are kept (their size is known). ShardError as `decode_sample_image`."""
        at = (sample.get("__url__", ""), sample["__key__"])
        hit = self._images.get(at)
        if hit is not None and (hit[1] is not None or not keep_decoded):
            return hit
        decoded = decode_sample_image(sample)
        out = (preprocess(decoded), decoded if keep_decoded else None)
        if torch.is_tensor(out[0]):
            size = out[0].nbytes + (decoded.width * decoded.height * len(decoded.getbands()) if keep_decoded else 0)
            if hit is not None:  # kept before without its decoded image: replaced, not counted twice
                self.used -= hit[0].nbytes
            if self._fits(size):
                self._images[at], self.used = out, self.used + size
        return out

    def tokens(self, texts: list[str], tokenizer: Callable) -> torch.Tensor:
        """`tokenizer(texts)`, [B, L] token ids, each text tokenized once while the cache has room (open_clip's
        tokenizer runs ftfy and a regex over every caption: 2.6 ms a batch of 64, twice with the EDA view)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        new = dict(zip(missing, (row.clone() for row in tokenizer(missing)))) if missing else {}
        for text, row in new.items():
            size = row.nbytes + len(text)
            if self._fits(size):
                self._tokens[text], self.used = row, self.used + size
        return torch.stack([self._tokens.get(t, new.get(t)) for t in texts])


class BatchStream:
    """One training worker's batches of a shard folder (see the module docstring).

    Raises ValueError if `global_batch` is not divisible by `world`, ShardError if the `shards` split
    has fewer shards than workers (the numbers named) and, while streaming, if a sample cannot be
    decoded or a loader process dies (the shard and key named). A `cache` keeps samples, decoded images
    and tokens between epochs when decoding runs in a thread (`loader_workers` 0)."""

    def __init__(self, data_dir: Path, global_batch: int, rank: int, world: int, seed: int,
                 preprocess: Callable, tokenizer: Callable, views: frozenset = frozenset(),
                 split: str = "auto", shuffle_buffer: int = 1000, loader_workers: int = 0,
                 pin_memory: bool = False, cache: SampleCache | None = None):
        sizes = shard_sizes(data_dir)
        self.data_dir = data_dir
        self.urls = [str(data_dir / name) for name in sizes]
        self.n_samples = sum(sizes.values())
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} workers")
        self.split = resolve_split(split, world, len(self.urls))
        if self.split == "shards" and len(self.urls) < world:
            raise ShardError(f"{data_dir}: {len(self.urls)} shards for {world} workers: the shards split needs a shard "
                             f"per worker; use the samples split, or curate with a smaller shard_maxcount")
        self.local_batch, self.global_batch = global_batch // world, global_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.preprocess, self.tokenizer, self.views = preprocess, tokenizer, frozenset(views)
        self.shuffle_buffer, self.loader_workers, self.pin_memory = shuffle_buffer, loader_workers, pin_memory
        self.text_views = TextViews(seed) if "text_aug" in self.views else None
        self.cache = cache if cache is not None and not loader_workers else SampleCache()

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.global_batch

    def _raw(self, epoch: int) -> Iterator[dict]:
        urls = list(self.urls)
        random.Random(sample_seed(self.seed, f"epoch{epoch}", "shards")).shuffle(urls)
        buffer_rng = random.Random(sample_seed(self.seed, f"epoch{epoch}", "buffer"))
        shards = urls if self.split == "samples" else urls[self.rank::self.world]
        while True:
            yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=buffer_rng)(self.cache.samples(shards))
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
        tensor, image = self.cache.image(sample, self.preprocess, keep_decoded="image_aug" in self.views)
        caption = sample["txt"].decode()
        key = sample["__key__"]
        out = {"image": tensor, "caption": caption, "key": key}
        if "image_aug" in self.views:
            out["image_aug"] = image_view(image, sample_seed(self.seed, f"{key}@{epoch}", "image_aug"), self.preprocess)
        if "text_aug" in self.views:
            out["text_aug"] = self.text_views(key, caption)
        return out

    def _batches(self, epoch: int, skip: int, n: int, part: int = 0, parts: int = 1,
                 on_sample: Callable[[dict], None] | None = None) -> Iterator[dict]:
        """Batches skip + part, skip + part + parts, ... < n of the epoch, decoded; the others are
        read (the shuffle buffer needs them) but not decoded."""
        samples = self._local_samples(epoch)
        for b in range(n):
            chunk = list(itertools.islice(samples, self.local_batch))
            self._short(len(chunk), epoch)
            if b < skip or (b - skip) % parts != part:
                continue
            decoded = []
            for s in chunk:
                if on_sample:
                    on_sample(s)
                decoded.append(self._decode(s, epoch))
            batch = {"image": torch.stack([c["image"] for c in decoded]),
                     "text": self.cache.tokens([c["caption"] for c in decoded], self.tokenizer),
                     "keys": [c["key"] for c in decoded]}
            if "image_aug" in self.views:
                batch["image_aug"] = torch.stack([c["image_aug"] for c in decoded])
            if "text_aug" in self.views:
                batch["text_aug"] = self.cache.tokens([c["text_aug"] for c in decoded], self.tokenizer)
            yield batch

    def epoch(self, epoch: int, skip_batches: int = 0, n_batches: int | None = None) -> Iterator[dict]:
        """The worker's batches of one epoch (the first `n_batches`, default all) after `skip_batches`,
        built ahead of use: dicts of tensors (`image` [B, 3, H, W] float, `text` [B, L] int64, and the
        views' `image_aug` / `text_aug`) and `keys` (B strings). Pinned when `pin_memory`."""
        n = n_batches or self.steps_per_epoch
        return parallel(lambda part, parts, on_sample: self._batches(epoch, skip_batches, n, part, parts, on_sample),
                        self.loader_workers, f"{self.data_dir} (epoch {epoch})", self.pin_memory)

    def _short(self, got: int, epoch: int) -> None:
        if got < self.local_batch:
            raise ShardError(f"{self.data_dir}: the shards ran out in epoch {epoch}: they hold fewer than the "
                             f"{self.n_samples} samples sizes.json counts (a tar cut short or replaced); run the "
                             f"stage that wrote them again")


class _Failure:
    """An exception raised in a loader process, handed over in the batch's turn and raised as itself."""

    def __init__(self, error: Exception):
        self.error = error


Produce = Callable[[int, int, Callable[[dict], None]], Iterator]


class _Parts(torch.utils.data.IterableDataset):
    """`produce(part, parts, on_sample)` in each DataLoader process: part p of P yields items p, p+P, ..."""

    def __init__(self, produce: Produce, workers: int):
        self.produce, self.workers = produce, workers
        # what each loader process decodes now, to name the sample if the process dies (a decoder
        # crash or the OOM killer leaves no exception to send)
        self.slots = multiprocessing.get_context("fork").Array(ctypes.c_char, _SLOT * workers, lock=False)

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        part, parts = info.id, info.num_workers

        def on_sample(sample: dict) -> None:
            note = f"{os.getpid()}\t{sample.get('__url__', '?')}\t{sample['__key__']}".encode()[:_SLOT]
            self.slots[part * _SLOT:(part + 1) * _SLOT] = note.ljust(_SLOT, b"\0")

        try:
            yield from self.produce(part, parts, on_sample)
        except Exception as err:  # noqa: BLE001 (raised by the consumer, in order, as itself)
            try:  # an error that cannot cross to the consumer would be dropped with its batches: say it instead
                pickle.loads(pickle.dumps(err))
            except Exception:  # noqa: BLE001
                err = ShardError(f"{type(err).__name__} in a loader process: {err}")
            yield _Failure(err)

    def died(self, err: RuntimeError, where: str) -> ShardError:
        pids = set(re.findall(r"\d+", str(err)))  # "DataLoader worker (pid(s) 123, 456) exited ..."
        notes = [bytes(self.slots[p * _SLOT:(p + 1) * _SLOT]).rstrip(b"\0").decode(errors="replace").split("\t")
                 for p in range(self.workers)]
        named = [f"sample {key!r} of {url}" for pid, url, key in (n for n in notes if len(n) == 3) if pid in pids]
        return ShardError(f"{where}: a loader process died; the last sample it started decoding: "
                          f"{' and '.join(named) or 'none'} ({err}): a sample that crashes the image decoder, or out "
                          f"of memory (fewer loader processes or a smaller batch need less)")


def parallel(produce: Produce, workers: int, where: str, pin_memory: bool = False) -> Iterator[dict]:
    """The items (dicts) of `produce(part, parts, on_sample)` in order 0, 1, 2, ... whatever `workers`: with 0,
    `produce(0, 1, None)` in a background thread (`prefetch`); else `workers` forked DataLoader
    processes, process p yielding items p, p+P, ... (torch's DataLoader takes one from each in turn).
    `produce` calls `on_sample` with each webdataset sample before decoding it. An exception in a
    process is raised as itself in its item's turn; a process that dies raises ShardError naming
    `where` and the sample it was decoding. `pin_memory`: page-locked tensors, for async GPU copies."""
    if not workers:
        stream = prefetch(produce(0, 1, None))
        try:
            for item in stream:
                yield {k: v.pin_memory() if pin_memory and torch.is_tensor(v) else v for k, v in item.items()}
        finally:  # closed now, not whenever the collector frees it: a consumer that stops early stops the thread
            stream.close()
        return
    dataset = _Parts(produce, workers)
    # fork: the producer needs no pickling; its own generator: the DataLoader draws its processes'
    # base seed from it, not from the trainer's global RNG (our decoding seeds itself per sample)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                         multiprocessing_context="fork", generator=torch.Generator().manual_seed(0))
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGCHLD) if main else None
    items = iter(loader)
    if main:  # torch's SIGCHLD handler would raise a dead process's error wherever the consumer is (a forward
        signal.signal(signal.SIGCHLD, handler)  # pass); without it the loader's status check raises it below
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RuntimeError as err:
            if "DataLoader worker" not in str(err):
                raise
            raise dataset.died(err, where) from None
        if isinstance(item, _Failure):
            raise item.error
        yield item


def prefetch(batches: Iterator[dict], depth: int = 2) -> Iterator[dict]:
    """Build the next batches in a background thread while the model trains on this one (torch
    releases the GIL in its kernels, so decoding overlaps compute). Order and content unchanged; a
    consumer that stops early (a diverged run) stops the thread too."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in batches:
                if not put(batch):
                    return
        except BaseException as err:  # re-raised in the consumer
            put(err)
        put(done)

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
