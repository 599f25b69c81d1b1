"""Sources of image-caption pairs, cut into partitions that curate processes in parallel.

`plan(sources, ...)` checks every source (files exist, CSV columns present, shards found)
before any work and cuts them into partitions; `read_partition` streams one partition's
raw records. A record that is broken at the source (missing file, truncated tar member)
still comes out, carrying its rejection, so that it is quarantined and counted.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand
from PIL import Image

from tasks import corpus
from tasks.config import CsvSource, GeneratedSource, ImageFolderSource, WebdatasetSource
from tasks.images import Rejected
from tasks.shards import TruncatedTar, iter_tar_samples

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9-]")


class SourceError(ValueError):
    """A source that cannot be read at all (named in the message); raised before any work."""


@dataclass(frozen=True)
class Partition:
    index: int  # position in the plan: fixes output order
    source: str
    split: str
    start: int = 0
    stop: int = 0
    url: str = ""  # webdataset: one input tar per partition


@dataclass
class RawRecord:
    key: str
    origin: str  # where it came from: a path, a tar member or a generator index
    split: str
    caption: str | None = None
    cls: int | None = None
    data: bytes | None = None  # encoded image to decode
    image: Image.Image | None = None  # or an already decoded image (generated corpus)
    rejected: Rejected | None = None  # broken at the source


def indexed_key(source: str, split: str, index: int) -> str:
    return f"{source}_{split}_{index:09d}"


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand then glob; every concrete (non-glob) path must exist."""
    urls: list[str] = []
    for part in braceexpand(pattern):
        if glob.has_magic(part):
            urls.extend(sorted(glob.glob(part)))
        elif os.path.isfile(part):
            urls.append(part)
        else:
            raise SourceError(f"webdataset shard not found: {part} (from urls {pattern!r})")
    if not urls:
        raise SourceError(f"webdataset urls {pattern!r} match no file")
    return urls


def _csv_rows(src: CsvSource) -> Iterator[dict]:
    with open(src.path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter=src.sep)


def _check_csv(src: CsvSource) -> int:
    if not src.path.is_file():
        raise SourceError(f"source {src.name!r}: CSV not found: {src.path}")
    with open(src.path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f, delimiter=src.sep), [])
        missing = [c for c in (src.image_column, src.caption_column) if c not in header]
        if missing:
            raise SourceError(
                f"source {src.name!r}: {src.path} lacks column(s) {missing}; header is {header} "
                f"(set image_column/caption_column/sep in params)"
            )
        return sum(1 for _ in csv.reader(f, delimiter=src.sep))


def folder_classes(src: ImageFolderSource) -> list[str]:
    if not src.root.is_dir():
        raise SourceError(f"source {src.name!r}: image folder not found: {src.root}")
    classes = sorted(d.name for d in src.root.iterdir() if d.is_dir())
    if not classes:
        raise SourceError(f"source {src.name!r}: {src.root} has no class subfolders (expected root/<class>/<image>)")
    return classes


def _folder_files(src: ImageFolderSource) -> list[tuple[int, Path]]:
    return [
        (ci, p)
        for ci, name in enumerate(folder_classes(src))
        for p in sorted((src.root / name).iterdir())
        if p.is_file()
    ]


def eval_metadata(src) -> dict | None:
    """Class names and prompt templates of the eval set a source provides, if any."""
    if isinstance(src, GeneratedSource):
        return corpus.eval_metadata() if src.eval_per_class else None
    if isinstance(src, ImageFolderSource):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # imports torch: only when needed

        return {
            "classnames": [c.replace("_", " ") for c in folder_classes(src)],
            "templates": [t("{}") for t in OPENAI_IMAGENET_TEMPLATES],
        }
    return None


def plan(sources: list, partition_size: int) -> list[Partition]:
    """Check every source and cut it into partitions of at most partition_size samples."""
    parts: list[Partition] = []

    def ranges(name: str, split: str, n: int):
        for start in range(0, n, partition_size):
            parts.append(Partition(len(parts), name, split, start, min(n, start + partition_size)))

    for src in sources:
        if isinstance(src, GeneratedSource):
            for split, n in corpus.split_sizes(src).items():
                ranges(src.name, split, n)
        elif isinstance(src, CsvSource):
            ranges(src.name, "train", _check_csv(src))
        elif isinstance(src, WebdatasetSource):
            for url in expand_urls(src.urls):
                parts.append(Partition(len(parts), src.name, "train", url=url))
        elif isinstance(src, ImageFolderSource):
            ranges(src.name, "eval", len(_folder_files(src)))
    return parts


def read_partition(src, part: Partition, seed: int, side: int) -> Iterator[RawRecord]:
    if isinstance(src, GeneratedSource):
        for i in range(part.start, part.stop):
            s = corpus.render_sample(src, seed, part.split, i, side)
            yield RawRecord(indexed_key(src.name, s.split, i), f"{part.split}[{i}]", s.split, s.caption, s.cls, image=s.image)
    elif isinstance(src, CsvSource):
        yield from _read_csv(src, part)
    elif isinstance(src, WebdatasetSource):
        yield from read_tar(src.name, part.url)
    elif isinstance(src, ImageFolderSource):
        files = _folder_files(src)[part.start:part.stop]
        names = eval_metadata(src)["classnames"]
        for i, (ci, path) in enumerate(files, start=part.start):
            yield RawRecord(indexed_key(src.name, "eval", i), str(path), "eval", f"a photo of a {names[ci]}.", ci,
                            data=path.read_bytes())


def _read_csv(src: CsvSource, part: Partition) -> Iterator[RawRecord]:
    base = src.path.parent
    for i, row in enumerate(_csv_rows(src)):
        if i < part.start:
            continue
        if i >= part.stop:
            break
        key = indexed_key(src.name, "train", i)
        rel = (row.get(src.image_column) or "").strip()
        path = base / rel
        rec = RawRecord(key, f"{src.path}:{i + 2}:{rel}", "train", row.get(src.caption_column))
        if not rel or not path.is_file():
            rec.rejected = Rejected("missing_file", str(path))
        else:
            rec.data = path.read_bytes()
        yield rec


def _tar_record(source: str, url: str, sample: dict) -> RawRecord:
    key = sample["__key__"]
    safe = _UNSAFE_KEY_CHARS.sub("-", key.rsplit("/", 1)[-1])
    rec = RawRecord(f"{source}_{safe}", f"{url}:{key}", "train")
    txt = sample.get("txt")
    rec.caption = txt.decode("utf-8", errors="replace") if txt is not None else None
    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
    if image_ext is None:
        rec.rejected = Rejected("missing_image", f"members: {sorted(k for k in sample if k != '__key__')}")
    else:
        rec.data = sample[image_ext]
    return rec


def read_tar(source: str, url: str) -> Iterator[RawRecord]:
    """Stream an img2dataset/webdataset tar; a truncated tar ends with one rejected record
    for the sample being read when it broke, after the samples before it."""
    try:
        for sample in iter_tar_samples(url):
            yield _tar_record(source, url, sample)
    except TruncatedTar as err:
        rec = _tar_record(source, url, {"__key__": err.key or "start-of-tar"})
        rec.rejected = Rejected("truncated_tar_member", str(err))
        yield rec
