"""Byte-reproducible webdataset shards with a parquet manifest beside each tar."""
from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("source", pa.string()), ("split", pa.string()), ("cls", pa.int32()),
])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class TarSampleWriter:
    """Writes {"__key__": key, ext: bytes} samples to a tar, reproducibly: members sorted by name,
    fixed mtime, owner and mode, GNU headers (webdataset's TarWriter writes PAX headers, 2x slower)."""

    def __init__(self, fileobj):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(sample[ext]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(sample[ext]))

    def close(self) -> None:
        self._tar.close()


class ShardSink:
    """Writes samples to `{prefix}-{n:06d}.tar` (+ `.parquet`), rolling over at maxcount.

    Members are sorted per sample, with fixed mtime, owner and mode, so the same samples in
    the same order give the same bytes. Each tar and manifest appears only once complete.
    """

    def __init__(self, prefix: Path, maxcount: int):
        self.prefix, self.maxcount = prefix, maxcount
        self.shards: list[dict] = []  # {"tar": name, "n": count}
        self._tar = self._writer = None
        self._rows: list[dict] = []

    def _open(self):
        path = Path(f"{self.prefix}-{len(self.shards):06d}.tar")
        self._path = path
        self._tar = open(path.with_name(path.name + ".tmp"), "wb")
        self._writer = TarSampleWriter(self._tar)

    def write(self, sample: dict[str, bytes], row: dict) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._rows.append(row)
        if len(self._rows) >= self.maxcount:
            self._close()

    def _close(self):
        self._writer.close()
        self._tar.close()
        os.replace(self._tar.name, self._path)
        write_table(self._path.with_suffix(".parquet"), pa.Table.from_pylist(self._rows, schema=MANIFEST_SCHEMA))
        self.shards.append({"tar": self._path.name, "n": len(self._rows)})
        self._tar = self._writer = None
        self._rows = []

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._close()
        return self.shards


class TruncatedTar(Exception):
    """A tar that ends or breaks inside `key` (None: before the first sample)."""

    def __init__(self, key: str | None, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.key = key


# Members that tools leave in archives and folders (macOS resource forks and metadata, Windows
# thumbnails, Synology indexes): never samples or classes.
LEFT_BEHIND = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir"})


def left_behind(name: str) -> bool:
    """Whether a file or folder name is a hidden file or one a tool left behind (`.DS_Store`, `._x.jpg`, ...)."""
    return name.startswith(".") or name in LEFT_BEHIND


def member_key(path: str) -> tuple[str, str]:
    """(key, extension) of a tar member path by webdataset's rule: the key is the path up to the
    first dot of the file name (`cc3m.v1/000001.jpg` -> `cc3m.v1/000001`, `jpg`); a leading `./` is
    not part of it."""
    folder, _, name = posixpath.normpath(path).lstrip("/").rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_tar_samples(path) -> Iterator[dict]:
    """Read a webdataset tar as {"__key__": key, ext: bytes, ...}, one dict per sample, in the order
    of each key's first member.

    Members sharing a key (`member_key`) form a sample wherever they sit in the tar: webdataset
    wants them adjacent, but `tar -cf x.tar dir` stores files in directory order (and a file's
    second name as a hard link, which is read as the file). Directories,
    img2dataset's `_*` files and hidden or left-behind members (`left_behind`) are skipped. A
    truncated or corrupt tar raises TruncatedTar after the samples that were complete.
    """
    key, damage = None, None
    try:
        with tarfile.open(path, mode="r:*") as tar:  # random access: headers first, then each sample's members
            samples: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
            try:
                for info in tar:
                    parts = posixpath.normpath(info.name).lstrip("/").split("/")
                    wanted = info.isfile() or info.islnk()  # tar stores a file's second name as a hard link
                    if wanted and not parts[-1].startswith("_") and not any(map(left_behind, parts)):
                        base, ext = member_key(info.name)
                        samples.setdefault(base, []).append((ext.lower(), info))
            except (tarfile.TarError, EOFError, OSError) as err:  # cut short: the members before it are readable
                damage = err
            for key, members in samples.items():
                yield {"__key__": key} | {ext: tar.extractfile(info).read() for ext, info in members}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TruncatedTar(key, err) from err
    if damage is not None:  # the cut fell after the last complete sample's data
        raise TruncatedTar("end-of-tar", damage)


def rewrite_shard(src: Path, dest: Path, transform) -> int:
    """Stream shard `src` (tar + parquet) to `dest`, each sample through `transform(sample)`, which
    returns the sample to write or None to drop it; manifest rows follow the samples (caption from
    `txt`, sha256 from `json`). Atomic; src may be dest. Returns the number of samples written."""
    rows = {r["key"]: r for r in pq.read_table(src.with_suffix(".parquet")).to_pylist()}
    kept = []
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = TarSampleWriter(f)
        for sample in iter_tar_samples(src):
            new = transform(sample)
            if new is not None:
                writer.write(new)
                kept.append(dict(rows[sample["__key__"]], caption=new["txt"].decode(),
                                 sha256=json.loads(new["json"])["sha256"]))
        writer.close()
    os.replace(tmp, dest)
    write_table(dest.with_suffix(".parquet"), pa.Table.from_pylist(kept, schema=MANIFEST_SCHEMA))
    return len(kept)


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def image_ext(sample: dict) -> str:
    """The extension under which a webdataset sample holds its image."""
    return next(e for e in IMAGE_EXTS if e in sample)


def decode_sample_image(sample: dict):
    """A sample's image as a loaded RGB PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(sample[image_ext(sample)])) as im:
        return im.convert("RGB")


def read_manifest(shard_dir: Path) -> pa.Table:
    """All per-shard manifests of a folder, in shard order."""
    files = sorted(shard_dir.glob("*.parquet"))
    if not files:
        return MANIFEST_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=MANIFEST_SCHEMA) for f in files])


def swap_into_place(partial: Path, out: Path) -> Path:
    """Replace `out` with the finished `partial` folder (rename; the old copy is removed after)."""
    old = Path(f"{out}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when possible (the source stays intact), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
