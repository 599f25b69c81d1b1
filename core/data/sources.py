"""Sources of image-caption pairs, cut into partitions that curate processes in parallel.

`plan(sources, ...)` checks every source (files exist, CSV columns present, shards found)
before any work and cuts them into partitions; `read_partition` streams one partition's
raw records. A record that is broken at the source (missing file, truncated tar member)
still comes out, carrying its rejection, so that it is quarantined and counted.
"""
from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import itertools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand
from PIL import Image

from core.data import corpus
from core.errors import InputError
from core.data.images import Rejected
from core.data.shards import image_ext, iter_tar_samples, left_behind

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9-]+")
_SYNSET = re.compile(r"^n\d{8}$")  # a WordNet synset id, as ImageNet names its class folders
log = logging.getLogger(__name__)
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tbz2?|tar\.xz|txz)$", re.IGNORECASE)


class SourceError(InputError):
    """A source that cannot be read at all (named in the message); raised before any work."""


@dataclass(frozen=True)
class Partition:
    index: int  # position in the plan: fixes output order
    source: str
    split: str
    start: int = 0
    stop: int = 0
    url: str = ""  # webdataset: one input tar per partition
    shard: str = ""  # webdataset: the tar's id within its source (`shard_ids`)


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


def key_part(text: str) -> str:
    """`text` as a key part of [A-Za-z0-9-]: itself when it already is one, else a readable form
    plus 8 hex digits of its sha256, so that distinct texts stay distinct (`cc3m.v1/000001` ->
    `cc3m-v1-000001-<hash>`)."""
    readable = _UNSAFE_KEY_CHARS.sub("-", text).strip("-")
    if readable == text:
        return text
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}".lstrip("-")


def shard_ids(urls: list[str]) -> list[str]:
    """Each tar's path below the folder common to all `urls`, without a `.tar` ending: `/d/00001.tar`
    -> `00001`, `a/00001` and `b/00001` when two folders share tar names, `shard.000` and
    `00000.tar.gz` as they are. Urls of distinct files (`expand_urls`) give distinct ids."""
    common = os.path.commonpath([os.path.dirname(os.path.realpath(u)) for u in urls])
    paths = [os.path.relpath(os.path.realpath(u), common).replace(os.sep, "/") for u in urls]
    ids = [p.removesuffix(".tar") for p in paths]
    return ids if len(set(ids)) == len(ids) else paths  # `x` beside `x.tar`: keep the names whole


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand then glob (`**` spans folders; a glob takes tar files only, not img2dataset's
    parquet and stats files beside them); every concrete (non-glob) path must exist. A tar that the
    pattern names several times, or by several paths, is read once."""
    urls: list[str] = []
    for part in braceexpand(pattern):
        if glob.has_magic(part):
            files = [p for p in sorted(glob.glob(part, recursive=True)) if os.path.isfile(p)]
            urls.extend(p for p in files if _TAR_NAME.search(p))
            if others := [p for p in files if not _TAR_NAME.search(p)]:
                log.info("webdataset urls %r: %d file(s) that are not tars skipped, e.g. %s", pattern, len(others),
                         others[:3])
        elif os.path.isfile(part):
            urls.append(part)
        else:
            raise SourceError(f"webdataset shard not found: {part} (from urls {pattern!r})")
    if not urls:
        raise SourceError(f"webdataset urls {pattern!r} match no file")
    first: dict[str, str] = {}
    for url in urls:
        first.setdefault(os.path.realpath(url), url)
    return list(first.values())


def _text_lines(path: Path, encoding: str, source: str) -> Iterator[str]:
    """The lines of a text file decoded with `encoding`, line ends kept (as the csv module wants).

    Raises SourceError naming the source, file, line and bytes where the text is not in that encoding.
    """
    try:
        with open(path, newline="", encoding=encoding) as f:
            yield from f
    except UnicodeError:
        _locate_decode_error(path, encoding, source)
        raise


def _locate_decode_error(path: Path, encoding: str, source: str) -> None:
    """Raise SourceError at the first line of `path` that is not valid `encoding` (the text layer's
    error gives a position in its read buffer, not a line)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    line = 1
    with open(path, "rb") as f:
        for raw in itertools.chain(f, [b""]):  # b"": flush the decoder at the end
            try:
                line += decoder.decode(raw, final=not raw).count("\n")
            except UnicodeError as err:
                hint = _encoding_hint(path) or "e.g. cp1252 for a CSV saved by Excel on Windows, latin-1, utf-16"
                raise SourceError(f"source {source!r}: {path} line {line}: {decode_problem(err, encoding)}; set this "
                                  f"source's `encoding` in params ({hint})") from None


def decode_problem(err: UnicodeError, encoding: str) -> str:
    """`err` in words: which bytes are not valid `encoding`, and where."""
    if isinstance(err, UnicodeDecodeError):
        return (f"bytes {err.object[err.start:err.end].hex(' ')} at byte {err.start + 1} are not valid "
                f"{encoding} ({err.reason})")
    return f"not valid {encoding} ({err})"


def _encoding_hint(path: Path) -> str:
    """What a text file's first bytes say of its encoding ("" when nothing)."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(codecs.BOM_UTF8):
        return "it starts with a UTF-8 byte-order mark: encoding utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "it starts with a UTF-16 byte-order mark: encoding utf-16"
    if b"\0" in head:
        return "it holds NUL bytes, as UTF-16 without a byte-order mark does: encoding utf-16-le or utf-16-be"
    return ""


def _csv_rows(src) -> Iterator[tuple[str, list[str]]]:
    """(`line N` or `lines N-M`, fields) of each non-blank row, the header first. Parsed in csv's
    strict mode: a quote that never closes, text after a closing quote or a runaway field is a
    SourceError naming the line, instead of rows silently merged into one caption."""
    rows = csv.reader(_text_lines(src.path, src.encoding, src.name), delimiter=src.sep, strict=True)
    try:
        for fields in rows:
            if fields:
                start = rows.line_num - sum(f.count("\n") for f in fields)  # a quoted field may span lines
                yield (f"line {start}" if start == rows.line_num else f"lines {start}-{rows.line_num}"), fields
    except csv.Error as err:
        hint = _encoding_hint(src.path) or "a quote that never closes, or one inside an unquoted field?"
        raise SourceError(f"source {src.name!r}: {src.path} line {rows.line_num}: {err} ({hint})") from None


def _check_csv(src) -> int:
    """The number of rows of a CSV source, after checking its header; SourceError names what is wrong."""
    if not src.path.is_file():
        raise SourceError(f"source {src.name!r}: CSV not found: {src.path}")
    rows = _csv_rows(src)
    _, header = next(rows, (None, []))
    missing = [c for c in (src.image_column, src.caption_column) if c not in header]
    if missing:
        hint = _encoding_hint(src.path)
        shown = [f[:40] for f in header[:10]] + (["..."] if len(header) > 10 else [])
        raise SourceError(
            f"source {src.name!r}: {src.path} lacks column(s) {missing}; header is {shown} "
            f"({f'{hint}; ' if hint else ''}set image_column/caption_column/sep/encoding in params)"
        )
    n = sum(1 for _ in rows)
    if not n:
        raise SourceError(f"source {src.name!r}: {src.path} has a header and no row")
    return n


def folder_classes(src) -> list[str]:
    """The class folders of an image folder, sorted (the class index is the position); hidden
    folders and those tools leave behind (`.ipynb_checkpoints`, `__MACOSX`) are not classes."""
    if not src.root.is_dir():
        what = "is not a folder" if src.root.exists() else "not found"
        raise SourceError(f"source {src.name!r}: image folder {what}: {src.root}")
    classes = sorted(d.name for d in src.root.iterdir() if d.is_dir() and not left_behind(d.name))
    if not classes:
        raise SourceError(f"source {src.name!r}: {src.root} has no class subfolders (expected root/<class>/<image>)")
    return classes


def _class_files(folder: Path) -> list[Path]:
    """Every file below a class folder, at any depth, sorted; hidden and left-behind ones skipped, and
    what cannot hold an image (pipes, sockets, devices). A broken link stays: it is a missing file."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not left_behind(d)]
        found.extend(p for p in (Path(dirpath) / f for f in filenames if not left_behind(f))
                     if p.is_file() or p.is_symlink() and not p.exists())
    return sorted(found)


@lru_cache(maxsize=16)  # every partition of a folder asks: walk it once per process
def _folder_files(src) -> list[tuple[int, Path]]:
    """(class index, file) of every image of an image folder; SourceError names empty class folders."""
    files = {name: _class_files(src.root / name) for name in folder_classes(src)}
    empty = [name for name, found in files.items() if not found]
    if empty:
        raise SourceError(
            f"source {src.name!r}: class folder(s) {empty} under {src.root} hold no image; an empty class still "
            f"counts in chance level and in the ASR set: remove the folder(s) or add images"
        )
    return [(ci, p) for ci, found in enumerate(files.values()) for p in found]


@lru_cache(maxsize=1)
def imagenet_synset_names() -> dict[str, str]:
    """Class name of each ImageNet synset id: open_clip's ImageNet-1k names (open_clip lists them in
    the order of the sorted 1k synset ids, which timm ships), else the first WordNet lemma of the
    ImageNet-21k synset (timm's descriptions)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    full = ImageNetInfo("imagenet-22k")
    names = {wnid: desc.split(",")[0].strip() for wnid, desc in zip(full.label_names(), full.label_descriptions())}
    names.update(zip(sorted(ImageNetInfo("imagenet-1k").label_names()), IMAGENET_CLASSNAMES))
    return names


def _read_class_mapping(src) -> dict[str, str]:
    """The user's folder -> class name file: a JSON object, or CSV/TSV rows of (folder, name)."""
    path = src.classnames
    if not path.is_file():
        raise SourceError(f"source {src.name!r}: classnames file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads("".join(_text_lines(path, src.encoding, src.name)))
        except json.JSONDecodeError as err:
            raise SourceError(f"source {src.name!r}: {path} is not valid JSON ({err})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise SourceError(f"source {src.name!r}: {path} must hold one JSON object of class folder -> class name, "
                              f'e.g. {{"n07753592": "banana"}}')
        return {k: v.strip() for k, v in mapping.items()}
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    mapping = {}
    for line, row in enumerate(csv.reader(_text_lines(path, src.encoding, src.name), delimiter=sep), start=1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise SourceError(f"source {src.name!r}: {path} line {line}: expected 2 columns (class folder, class name) "
                              f"separated by {sep!r}, got {row}")
        mapping[row[0].strip()] = row[1].strip()  # a header row maps a folder that does not exist: harmless
    return mapping


@lru_cache(maxsize=16)
def class_names(src) -> list[str]:
    """Class names of an image folder in class-index order: from the source's `classnames` file when
    given; else `imagenet_synset_names` for folders named by a synset id (`n07753592`) and the
    folder name with `_` as a space for others. Raises SourceError naming folders a mapping lacks,
    or class folders that are only numbers. A name given to several folders is only a warning:
    open_clip's ImageNet-1k names repeat two (missile, sunglasses), as the benchmark does."""
    folders = folder_classes(src)
    if src.classnames is None and all(f.isdigit() for f in folders):
        raise SourceError(f"source {src.name!r}: the class folders of {src.root} are numbers ({folders[:3]}...), "
                          f"which are no class names for zero-shot prompts; give a classnames file (JSON or CSV of "
                          f"folder, name: README, Bringing your own data)")
    if src.classnames is not None:
        mapping, where = _read_class_mapping(src), src.classnames
    else:  # synset folders by ImageNet's names, the others by their own
        synsets = imagenet_synset_names() if any(_SYNSET.match(f) for f in folders) else {}
        mapping = {f: synsets.get(f, "") if _SYNSET.match(f) else f.replace("_", " ") for f in folders}
        where = "the ImageNet synset ids (open_clip's ImageNet-1k names, timm's WordNet lemmas beyond)"
    missing = [f for f in folders if not mapping.get(f)]
    if missing:
        raise SourceError(f"source {src.name!r}: no class name for folder(s) {missing[:10]} of {src.root} in {where}"
                          + ("" if src.classnames else "; give a classnames file (JSON or CSV of folder, name)"))
    names = [mapping[f] for f in folders]
    repeated = {n: [f for f in folders if mapping[f] == n] for n, k in Counter(names).items() if k > 1}
    if repeated:
        log.warning("source %r: several folders get the same class name (%s); zero-shot cannot tell them apart",
                    src.name, "; ".join(f"{n!r}: {fs}" for n, fs in list(repeated.items())[:10]))
    return names


def eval_metadata(src) -> dict | None:
    """Class names and prompt templates of the eval set a source provides, if any."""
    if src.kind == "generated":
        return corpus.eval_metadata() if src.eval_per_class else None
    if src.kind == "image_folder":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # imports torch: only when needed

        return {"classnames": class_names(src), "templates": [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]}
    return None


def plan(sources: list, partition_size: int) -> list[Partition]:
    """Check every source and cut it into partitions of at most partition_size samples."""
    parts: list[Partition] = []

    def ranges(name: str, split: str, n: int):
        for start in range(0, n, partition_size):
            parts.append(Partition(len(parts), name, split, start, min(n, start + partition_size)))

    for src in sources:
        if src.kind == "generated":
            for split, n in corpus.split_sizes(src).items():
                ranges(src.name, split, n)
        elif src.kind == "csv":
            ranges(src.name, "train", _check_csv(src))
        elif src.kind == "webdataset":
            urls = expand_urls(src.urls)
            for url, shard in zip(urls, shard_ids(urls)):
                parts.append(Partition(len(parts), src.name, "train", url=url, shard=shard))
        elif src.kind == "image_folder":
            class_names(src)  # a missing or bad name mapping stops the stage here, before any work
            ranges(src.name, "eval", len(_folder_files(src)))
    return parts


@lru_cache(maxsize=16)
def source_signature(src) -> tuple:
    """(path, bytes, mtime ns) of each file a source reads, as DVC tells a changed file: the CSV
    (not the images it names), the tars, an image folder's images and its classnames file. Part of
    the identity of curated partitions, so that a changed source is curated again, not resumed."""
    if src.kind == "generated":
        paths = []
    elif src.kind == "csv":
        paths = [src.path]
    elif src.kind == "webdataset":
        paths = [Path(u) for u in expand_urls(src.urls) if "://" not in u]
    else:
        paths = [p for _, p in _folder_files(src)] + ([src.classnames] if src.classnames else [])
    signature = []
    for path in paths:
        try:
            st = path.stat()
            signature.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:  # a broken link: quarantined as missing_file when read
            signature.append((str(path), None, None))
    return tuple(signature)


def read_partition(src, part: Partition, seed: int, side: int) -> Iterator[RawRecord]:
    if src.kind == "generated":
        for i in range(part.start, part.stop):
            s = corpus.render_sample(src, seed, part.split, i, side)
            yield RawRecord(indexed_key(src.name, s.split, i), f"{part.split}[{i}]", s.split, s.caption, s.cls, image=s.image)
    elif src.kind == "csv":
        yield from _read_csv(src, part)
    elif src.kind == "webdataset":
        yield from read_tar(src, part)
    elif src.kind == "image_folder":
        files = _folder_files(src)[part.start:part.stop]
        names = class_names(src)
        for i, (ci, path) in enumerate(files, start=part.start):
            rec = RawRecord(indexed_key(src.name, "eval", i), str(path), "eval", f"a photo of a {names[ci]}.", ci)
            _read_file(rec, path)
            yield rec


def _read_csv(src, part: Partition) -> Iterator[RawRecord]:
    rows = _csv_rows(src)
    _, header = next(rows)
    for i, (where, fields) in enumerate(itertools.islice(rows, part.start, part.stop), start=part.start):
        row = dict(zip(header, fields))
        rel = (row.get(src.image_column) or "").strip()
        rec = RawRecord(indexed_key(src.name, "train", i), f"{src.path} {where}: {rel}", "train",
                        row.get(src.caption_column))
        if len(fields) > len(header):
            rec.rejected = Rejected("malformed_row", f"{len(fields)} fields, the header has {len(header)}: an "
                                                     f"unquoted {src.sep!r} in a field?")
        elif not rel:
            rec.rejected = Rejected("missing_file", f"no image path in column {src.image_column!r}")
        else:
            _read_file(rec, src.path.parent / rel)
        yield rec


def _read_file(rec: RawRecord, path: Path) -> None:
    """The record's image bytes from `path`, or its rejection when the file is missing or unreadable."""
    try:
        rec.data = path.read_bytes()
    except FileNotFoundError:
        rec.rejected = Rejected("missing_file", str(path))
    except OSError as err:  # a folder, no permission, an I/O error
        rec.rejected = Rejected("unreadable_file", f"{path}: {err.strerror or err}")


def _tar_record(src, part: Partition, sample: dict) -> RawRecord:
    key = sample["__key__"]
    rec = RawRecord(f"{src.name}_{key_part(part.shard)}_{key_part(key)}", f"{part.url}:{key}", "train")
    ext = image_ext(sample)
    if ext is None:
        rec.rejected = Rejected("missing_image", f"members: {sorted(k for k in sample if k != '__key__')}")
    else:
        rec.data = sample[ext]
    if "txt" in sample:
        try:
            rec.caption = sample["txt"].decode(src.encoding)
        except UnicodeError as err:
            rec.rejected = Rejected("undecodable_caption", decode_problem(err, src.encoding))
    return rec


def read_tar(src, part: Partition) -> Iterator[RawRecord]:
    """Stream one img2dataset/webdataset tar (`part.url`) as records keyed `{source}_{shard}_{member
    key}`, unique across the source (`part.shard` is the tar's id from `shard_ids`). A sample that
    a damaged tar cut or broke (`iter_tar_samples`) is a rejected record, and the others are read."""
    for sample in iter_tar_samples(part.url, keep_going=True):
        rec = _tar_record(src, part, sample)
        if "__damaged__" in sample:
            rec.rejected = Rejected("truncated_tar_member", sample["__damaged__"])
        yield rec
