"""Byte-reproducible webdataset shards with a parquet manifest beside each tar."""
from __future__ import annotations

import bz2
import hashlib
import io
import itertools
import json
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import InputError

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("source", pa.string()), ("split", pa.string()), ("cls", pa.int32()),
])


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Write `path` atomically: yields a temporary name beside it, renamed over `path` when the block
    ends and removed if it fails (a full disk leaves no `.tmp` behind)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_table(path: Path, table: pa.Table) -> None:
    with replacing(path) as tmp:
        pq.write_table(table, tmp)


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
    the same order give the same bytes. Each tar and manifest appears only once complete; used as a
    context manager, a failure removes the tar being written.
    """

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if err is not None and self._tar is not None:
            try:
                self._tar.close()  # flushing may fail the same way (a full disk)
            except OSError:
                pass
            Path(self._tar.name).unlink(missing_ok=True)

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

    def __init__(self, key: str | None, detail: str):
        super().__init__(detail)
        self.key = key


# Members that tools leave in archives and folders (macOS resource forks and metadata, Windows
# thumbnails, Synology indexes): never samples or classes.
LEFT_BEHIND = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "@eaDir"})
# magic bytes -> a decompressor that gives out all it can of a stream cut short (gzip's file object would not)
_DECOMPRESSORS = {b"\x1f\x8b": lambda: zlib.decompressobj(zlib.MAX_WBITS | 16), b"BZh": bz2.BZ2Decompressor,
                  b"\xfd7zXZ": lzma.LZMADecompressor}
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, KeyError, zlib.error, lzma.LZMAError)  # KeyError: a lost link


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


def _is_sample_member(info: tarfile.TarInfo, key: str, ext: str) -> bool:
    """A regular file or hard link (tar's second name for a file) with an extension, that is not
    img2dataset's `_*` metadata nor hidden or left behind (`left_behind`); as webdataset, a member
    without an extension is no part of a sample."""
    folders, _, stem = key.rpartition("/")
    return ((info.isfile() or info.islnk()) and bool(ext) and not stem.startswith("_")
            and not left_behind(f"{stem}.{ext}") and "__MACOSX" not in folders.split("/"))


@contextmanager
def _seekable(path) -> Iterator[tuple[object, str | None]]:
    """(file object to read the tar from at random, damage found on the way): the file itself, or for
    a gzip/bzip2/xz tar its content decompressed once into a temporary file (seeking backwards in a
    compressed stream decompresses it again from the start)."""
    with open(path, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        make = next((d for magic, d in _DECOMPRESSORS.items() if head.startswith(magic)), None)
        if make is None:
            yield raw, None
            return
        with tempfile.TemporaryFile() as plain:
            damage, stream = None, make()
            try:
                while chunk := raw.read(1 << 20):
                    plain.write(stream.decompress(chunk))
                    while stream.eof and stream.unused_data:  # several compressed streams one after another
                        rest, stream = stream.unused_data, make()
                        plain.write(stream.decompress(rest))
                if not stream.eof:
                    damage = "the compressed stream is cut short"
            except _READ_ERRORS as err:  # damaged: keep what decompressed before it
                damage = f"{type(err).__name__} while decompressing: {err}"
            plain.seek(0)
            yield plain, damage


def _trailing_damage(tar: tarfile.TarFile) -> str | None:
    """What is wrong after the last member tarfile read, if anything: a tar ends in zero blocks
    (at least one, then padding); tarfile stops quietly at a missing marker or a broken header."""
    tar.fileobj.seek(tar.offset)
    rest = iter(lambda: tar.fileobj.read(1 << 20), b"")
    first = next(rest, b"")
    if len(first) < tarfile.BLOCKSIZE:
        return "the tar ends without its end-of-archive marker: cut short"
    if any(chunk.strip(b"\0") for chunk in itertools.chain([first], rest)):
        return f"unreadable header at byte {tar.offset}: the members after it are lost"
    return None


def iter_tar_samples(path, keep_going: bool = False) -> Iterator[dict]:
    """Read a webdataset tar as {"__key__": key, ext: bytes, ...}, one dict per sample, in the order
    of each key's first member.

    Members sharing a key (`member_key`) form a sample wherever they sit in the tar: webdataset
    wants them adjacent, but `tar -cf x.tar dir` stores files in directory order (and a file's
    second name as a hard link, which is read as the file). Members that are no part of a sample
    are skipped (`_is_sample_member`). Compressed tars (gzip, bzip2, xz) are read too.

    A damaged tar (cut short, a broken member header, a member that cannot be read) raises
    TruncatedTar naming the damaged sample: the one whose member could not be read, or the last one
    read before the damage, which may have lost members. With `keep_going`, that sample is yielded
    as {"__key__": key, "__damaged__": what failed} and the others are read on.
    """
    def damaged(key: str | None, detail: str) -> dict:
        if not keep_going:
            raise TruncatedTar(key, detail)
        return {"__key__": key or "start-of-tar", "__damaged__": detail}

    samples: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
    last = None  # key of the last member read: the sample a cut or a broken header may have hit
    with _seekable(path) as (fileobj, damage):
        try:
            with tarfile.open(fileobj=fileobj, mode="r:") as tar:
                try:
                    for info in tar:
                        key, ext = member_key(info.name)
                        if _is_sample_member(info, key, ext):
                            samples.setdefault(key, []).append((ext.lower(), info))
                            last = key
                    damage = damage or _trailing_damage(tar)
                except _READ_ERRORS as err:
                    damage = f"{type(err).__name__}: {err}"
                for key, members in samples.items():
                    if damage and key == last:
                        yield damaged(key, damage)
                        continue
                    try:
                        sample = {"__key__": key} | {ext: tar.extractfile(info).read() for ext, info in members}
                    except _READ_ERRORS as err:
                        yield damaged(key, f"{type(err).__name__}: {err}")
                        continue
                    yield sample
        except tarfile.ReadError as err:  # not even a first header
            damage = f"ReadError: {err}"
        if damage and last is None:
            yield damaged(None, damage)


def rewrite_shard(src: Path, dest: Path, transform) -> int:
    """Stream shard `src` (tar + parquet) to `dest`, each sample through `transform(sample)`, which
    returns the sample to write or None to drop it; manifest rows follow the samples (caption from
    `txt`, sha256 from `json`). Atomic; src may be dest. Returns the number of samples written."""
    rows = {r["key"]: r for r in pq.read_table(src.with_suffix(".parquet")).to_pylist()}
    kept = []
    with replacing(dest) as tmp, open(tmp, "wb") as f:
        writer = TarSampleWriter(f)
        for sample in iter_tar_samples(src):
            new = transform(sample)
            if new is not None:
                writer.write(new)
                kept.append(dict(rows[sample["__key__"]], caption=new["txt"].decode(),
                                 sha256=json.loads(new["json"])["sha256"]))
        writer.close()
    write_table(dest.with_suffix(".parquet"), pa.Table.from_pylist(kept, schema=MANIFEST_SCHEMA))
    return len(kept)


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def image_ext(sample: dict) -> str | None:
    """The extension under which a webdataset sample holds its image (None: it has none)."""
    return next((e for e in IMAGE_EXTS if e in sample), None)


class ShardError(InputError):
    """A shard folder whose tars do not hold what its sizes.json and manifests say; names the tar
    and, where one is at fault, the sample's key."""


def decode_sample_image(sample: dict):
    """A sample's image as a loaded RGB PIL image; ShardError naming the tar and key if it has none or
    it cannot be decoded."""
    from PIL import Image

    ext = image_ext(sample)
    if ext is None:
        raise ShardError(f"{sample.get('__url__', 'a shard')}: sample {sample['__key__']!r} has no image "
                         f"(members: {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ShardError(f"{sample.get('__url__', 'a shard')}: sample {sample['__key__']!r}: its {ext} cannot be "
                         f"decoded ({type(err).__name__}: {err}); run the stage that wrote the shard again") from None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(value, length: int = 64) -> str:
    """The hex sha256 (first `length` digits) of a JSON value with sorted keys: the identity of a
    resumable unit (curated partitions, pretrain and clean runs) or a combination of digests."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


_checked: dict[tuple, str] = {}  # stat signature of a shard folder -> its digest, for this process


def _signature(data_dir: Path, names) -> tuple | None:
    """(path, size, mtime, inode) of sizes.json and every tar and manifest: as DVC, a file whose stat
    is unchanged is taken as unchanged. None if one is missing."""
    files = [data_dir / "sizes.json"] + [data_dir / n for n in names] + [(data_dir / n).with_suffix(".parquet") for n in names]
    try:
        return tuple((str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])
    except OSError:
        return None


def check_shards(data_dir: Path, key: str) -> str:
    """Check a shard folder before it is trained on, and return a sha256 of its content.

    Every tar that `sizes.json` lists must exist, be readable to its end, hold exactly the samples
    its manifest (`.parquet`) lists and sizes.json counts, each with an image and a `txt` caption.
    The digest covers sizes.json, the manifests and every tar's bytes, so a tar changed in any way
    (even cut at a sample boundary) gives a new digest. Reads every tar's members and hashes its
    bytes: about the time of one webdataset pass over the shards (1.01x, benchmarks/shard_check.py);
    a folder whose files' stat is unchanged since this process checked it is not read again. Raises ShardError naming the
    params `key`, the tar and the sample at fault."""
    sizes_file = data_dir / "sizes.json"
    if not sizes_file.is_file():
        raise ShardError(f"{key}: {data_dir} holds no shards (no sizes.json): run the stage that writes it first")
    sizes = json.loads(sizes_file.read_text())
    signature = _signature(data_dir, sizes)
    if signature in _checked:
        return _checked[signature]
    digest = hashlib.sha256(sizes_file.read_bytes())
    for name, count in sizes.items():
        tar, manifest = data_dir / name, (data_dir / name).with_suffix(".parquet")
        for path in (tar, manifest):
            if not path.is_file():
                raise ShardError(f"{key}: {path} is missing (sizes.json lists {name} with {count} samples)")
        try:
            keys = []
            for sample in iter_tar_samples(tar):
                if image_ext(sample) is None or "txt" not in sample:
                    raise ShardError(f"{key}: {tar}: sample {sample['__key__']!r} has no "
                                     f"{'image' if image_ext(sample) is None else 'txt caption'}")
                keys.append(sample["__key__"])
        except TruncatedTar as err:
            where = f" at sample {err.key!r}" if err.key else " before its first sample"
            raise ShardError(f"{key}: {tar} is damaged{where}: {err}") from None
        try:
            listed = pq.read_table(manifest, columns=["key"]).column("key").to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise ShardError(f"{key}: {manifest} is not a readable manifest: {err}") from None
        if keys != listed or len(keys) != count:
            odd = sorted(set(keys) ^ set(listed))[:3]
            raise ShardError(f"{key}: {tar} holds {len(keys)} samples, its manifest lists {len(listed)} and "
                             f"sizes.json counts {count}{f' (differing keys: {odd})' if odd else ''}; "
                             f"run the stage that wrote {data_dir} again")
        digest.update(f"{name}\0{file_sha256(tar)}\0".encode())
        digest.update(manifest.read_bytes())
    if signature:
        _checked[signature] = digest.hexdigest()
    return digest.hexdigest()


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


def shard_sizes(data_dir: Path) -> dict[str, int]:
    sizes = data_dir / "sizes.json"
    if not sizes.is_file():
        raise FileNotFoundError(f"{data_dir} holds no shards (no sizes.json): run the stage that writes it first")
    return json.loads(sizes.read_text())
