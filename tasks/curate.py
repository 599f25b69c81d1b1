"""The curate stage's work, as plain functions (the Prefect flow only orchestrates them).

1. `plan_partitions`: check the sources, cut them into partitions (one output shard each at most).
2. `process_partition` (parallel): decode, RGB, resize, re-encode, clean the caption, dedup
   within the partition, write staging shards and a quarantine table. Idempotent: a finished
   partition is read back from its marker, so a rerun after a crash resumes.
3. `finalize`: dedup across partitions (first occurrence in plan order wins), number the shards,
   write sizes.json, classes.json, quarantine.parquet and stats.json into `<out>.partial`.
4. validation (core/data/validation.py), then `publish` swaps `<out>.partial` into place.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from core.errors import InputError
from tasks.config import Params
from core.data.images import Rejected, normalise_caption, decode_image, encode_image, resize
from core.data.shards import (
    MANIFEST_SCHEMA, ShardSink, atomic_write_bytes, atomic_write_json, link_or_copy, read_manifest, rewrite_shard,
    digest, swap_into_place, write_table,
)
from core.data.sources import Partition, eval_metadata, plan, read_partition, source_signature

QUARANTINE_SCHEMA = pa.schema([
    ("source", pa.string()), ("key", pa.string()), ("origin", pa.string()), ("split", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])


class CurateError(InputError):
    """The curated data cannot be used (an output folder or an eval class with no sample); names them."""


def fingerprint(params: Params) -> str:
    """The identity of the curated partitions, which names their staging area: the seed, the curate
    settings that change samples (`CurateConfig.identity`: not the runner or validation thresholds),
    the sources' files (`source_signature`) and the output folder (two outputs never share staging)."""
    cfg = params.curate
    return digest({"seed": params.seed, "curate": cfg.identity(), "out_dir": str(cfg.out_dir),
                   "sources": [source_signature(s) for s in cfg.sources]}, 16)


_STAGING_NAME = re.compile(r"^[0-9a-f]{16}$")  # a fingerprint
_OWNER = "out_dir.txt"  # in a staging area: the output folder it builds


def staging_dir(params: Params) -> Path:
    return params.curate.staging_dir / fingerprint(params)


def plan_partitions(params: Params) -> list[Partition]:
    """The partitions to curate (sources checked first); marks the staging area with its output folder."""
    parts = plan(params.curate.sources, params.curate.shard_maxcount)
    for key, folder in (("curate.staging_dir", staging_dir(params)), ("curate.out_dir", params.curate.out_dir.parent)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CurateError(f"{key}: cannot create {folder}: {err.strerror or err}") from None
    for leftover in staging_dir(params).glob("*.tmp"):  # half-written by a run that was killed
        leftover.unlink()
    atomic_write_bytes(staging_dir(params) / _OWNER, str(params.curate.out_dir.resolve()).encode())
    return parts


def _dedup_digest(image_sha: str, caption: str) -> bytes:
    return hashlib.sha256(f"{image_sha}\0{caption}".encode()).digest()


def process_partition(params: Params, part: Partition) -> dict:
    """Curate one partition into staging; returns its summary (also kept as a done-marker)."""
    cfg = params.curate
    stage = staging_dir(params)
    marker = stage / f"p{part.index:06d}.done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    stage.mkdir(parents=True, exist_ok=True)
    src = next(s for s in cfg.sources if s.name == part.source)
    with ShardSink(stage / f"p{part.index:06d}", cfg.shard_maxcount) as sink:
        quarantine, seen = [], {}
        counts = Counter()
        started = time.time()
        for rec in read_partition(src, part, params.seed, cfg.image_size):
            counts["seen"] += 1
            try:
                if rec.rejected:
                    raise rec.rejected
                caption, truncated = normalise_caption(rec.caption, cfg.caption.min_chars, cfg.caption.max_chars)
                im = rec.image if rec.image is not None else decode_image(rec.data, cfg.max_image_pixels)
                if min(im.size) < cfg.min_image_side:
                    raise Rejected("too_small", f"{im.width}x{im.height} < {cfg.min_image_side} px")
                data = encode_image(resize(im, cfg.image_size, cfg.resize_mode), cfg.image_format, cfg.quality)
                sha = hashlib.sha256(data).hexdigest()
                digest = _dedup_digest(sha, caption)
                if digest in seen:
                    raise Rejected("duplicate", f"same image and caption as {seen[digest]}")
                seen[digest] = rec.key
            except Rejected as r:
                quarantine.append(dict(source=part.source, key=rec.key, origin=rec.origin, split=part.split,
                                       reason=r.reason, detail=r.detail))
                continue
            counts["captions_truncated"] += truncated
            meta = dict(key=rec.key, source=part.source, split=rec.split, sha256=sha, width=cfg.image_size,
                        height=cfg.image_size, origin=rec.origin, cls=rec.cls)
            sample = {"__key__": rec.key, cfg.image_format: data, "txt": caption.encode(),
                      "json": json.dumps(meta, sort_keys=True).encode()}
            if rec.cls is not None:
                sample["cls"] = str(rec.cls).encode()
            sink.write(sample, {k: meta[k] for k in ("key", "sha256", "width", "height", "source", "split", "cls")}
                       | {"caption": caption})
        shards = sink.close()
    write_table(stage / f"p{part.index:06d}.quarantine.parquet", pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
    result = dict(partition=part.index, source=part.source, split=part.split, shards=shards,
                  seen=counts["seen"], written=sum(s["n"] for s in shards), captions_truncated=counts["captions_truncated"],
                  quarantined=dict(Counter(q["reason"] for q in quarantine)), started=started, finished=time.time())
    atomic_write_json(marker, result)
    return result


def _output_group(result: dict) -> str:
    """Where a partition's shards go: train/ for all training data, eval/<source>/ per eval set."""
    return "train" if result["split"] == "train" else f"eval/{result['source']}"


def finalize(params: Params, results: list[dict]) -> Path:
    """Assemble the staged partitions into `<out_dir>.partial`; returns that folder."""
    cfg = params.curate
    stage = staging_dir(params)
    partial = Path(f"{cfg.out_dir}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    results = sorted(results, key=lambda r: r["partition"])

    # Dedup across partitions (the first occurrence in plan order is kept) and number the shards per
    # output folder in plan order. Staging is only read, never changed: a shard that loses duplicates
    # is rewritten into `partial`, so a rerun after a failure finds each partition as its marker says.
    first: dict[str, dict[bytes, str]] = {}
    duplicates = []
    sizes: dict[str, dict[str, int]] = {}
    for res in results:
        group = _output_group(res)
        kept, names = first.setdefault(group, {}), sizes.setdefault(group, {})
        dest = partial / group
        dest.mkdir(parents=True, exist_ok=True)
        for shard in res["shards"]:
            staged, name = stage / shard["tar"], f"shard-{len(names):06d}.tar"
            rows = pq.read_table(staged.with_suffix(".parquet"), columns=["key", "sha256", "caption"]).to_pylist()
            firsts = {r["key"]: kept.setdefault(_dedup_digest(r["sha256"], r["caption"]), r["key"]) for r in rows}
            drop = {key: first for key, first in firsts.items() if key != first}  # key -> the key it repeats
            if not drop:
                link_or_copy(staged, dest / name)
                link_or_copy(staged.with_suffix(".parquet"), (dest / name).with_suffix(".parquet"))
                names[name] = shard["n"]
                continue

            def unless_repeated(sample, drop=drop, res=res):
                if sample["__key__"] not in drop:
                    return sample
                duplicates.append(dict(source=res["source"], key=sample["__key__"], split=res["split"],
                                       origin=json.loads(sample["json"])["origin"], reason="duplicate",
                                       detail=f"same image and caption as {drop[sample['__key__']]}"))
                return None

            n = rewrite_shard(staged, dest / name, unless_repeated)
            if n:
                names[name] = n
            else:
                (dest / name).unlink()
                (dest / name).with_suffix(".parquet").unlink()
    for group, names in sizes.items():
        atomic_write_json(partial / group / "sizes.json", names)
    for src in cfg.sources:
        meta = eval_metadata(src)
        if meta is not None and (partial / "eval" / src.name).is_dir():
            atomic_write_json(partial / "eval" / src.name / "classes.json", meta)

    quarantine = pa.concat_tables(
        [pq.read_table(stage / f"p{r['partition']:06d}.quarantine.parquet", schema=QUARANTINE_SCHEMA) for r in results]
        + [pa.Table.from_pylist(duplicates, schema=QUARANTINE_SCHEMA)]
    )
    partial.mkdir(parents=True, exist_ok=True)
    write_table(partial / "quarantine.parquet", quarantine)
    tables = manifests(partial)
    cfg = params.curate
    atomic_write_json(partial / "stats.json", _stats(results, quarantine, sizes) | {
        "repeated_images": {group: _repeated_share(t) for group, t in tables.items()},
        # how the samples are stored: the poison stage re-encodes triggered images the same way
        "encoding": {"image_format": cfg.image_format, "quality": cfg.quality, "shard_maxcount": cfg.shard_maxcount}})
    _check_coverage(partial, results, quarantine, tables)
    return partial


def _repeated_share(manifest: pa.Table) -> float:
    """Share of samples whose image another sample holds too, under another caption (the rows that
    `curate.validation.sha256_unique_mostly` counts against)."""
    counts = pa.compute.value_counts(manifest.column("sha256")).field("counts").to_numpy()
    return round(float(counts[counts > 1].sum() / manifest.num_rows), 6) if manifest.num_rows else 0.0


def _check_coverage(partial: Path, results: list[dict], quarantine: pa.Table, tables: dict) -> None:
    """CurateError unless every output folder holds samples and every eval class an image."""
    for group in sorted({_output_group(r) for r in results}):
        if tables.get(group, MANIFEST_SCHEMA.empty_table()).num_rows:
            continue
        mine = [r for r in results if _output_group(r) == group]
        names = sorted({r["source"] for r in mine})
        seen = sum(r["seen"] for r in mine)
        if not seen:
            raise CurateError(f"curate wrote no {group} sample: source(s) {names} hold no sample")
        reasons = Counter(row["reason"] for row in quarantine.to_pylist()
                          if row["source"] in names and row["split"] == mine[0]["split"])
        raise CurateError(f"curate wrote no {group} sample: all {seen} sample(s) of source(s) {names} were "
                          f"quarantined ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}); "
                          f"see {partial / 'quarantine.parquet'}")
    for group, table in tables.items():
        if group.startswith("eval/"):
            names = json.loads((partial / group / "classes.json").read_text())["classnames"]
            empty = sorted(set(range(len(names))) - set(table.column("cls").to_pylist()))
            if empty:
                raise CurateError(f"eval set {group}: class(es) {[names[c] for c in empty]} have no curated image "
                                  f"(all quarantined: see {partial / 'quarantine.parquet'}); an empty class still "
                                  f"counts in chance level and in the ASR set")


def _stats(results: list[dict], quarantine: pa.Table, sizes: dict) -> dict:
    by_source: dict[str, dict] = {}
    for res in results:
        s = by_source.setdefault(res["source"], {"seen": 0, "written": 0, "quarantined": Counter(), "captions_truncated": 0})
        s["seen"] += res["seen"]
        s["captions_truncated"] += res["captions_truncated"]
    for row in quarantine.select(["source", "reason"]).to_pylist():
        by_source[row["source"]]["quarantined"][row["reason"]] += 1
    for s in by_source.values():
        s["quarantined"] = dict(sorted(s["quarantined"].items()))
        s["written"] = s["seen"] - sum(s["quarantined"].values())
    seen = sum(s["seen"] for s in by_source.values())
    wall = max(r["finished"] for r in results) - min(r["started"] for r in results) if results else 0.0
    return {
        "sources": by_source,
        "splits": {group: sum(n.values()) for group, n in sizes.items()},
        "total": {"seen": seen, "written": sum(s["written"] for s in by_source.values()),
                  "quarantined": dict(sorted(Counter(quarantine.column("reason").to_pylist()).items()))},
        "throughput": {"partition_seconds": round(wall, 3), "samples_per_s": round(seen / wall, 1) if wall else None},
    }


def manifests(partial: Path) -> dict[str, "pa.Table"]:
    """Each output folder's concatenated manifest, keyed by folder (train, eval/<source>)."""
    return {str(p.parent.relative_to(partial)): read_manifest(p.parent) for p in sorted(partial.rglob("sizes.json"))}


def publish(params: Params, partial: Path) -> Path:
    """Swap the validated `<out>.partial` into place and drop the staging areas of this output folder:
    this run's and those that failed runs with other settings left behind (another output folder's
    are kept: it may be running or resume)."""
    out = swap_into_place(partial, params.curate.out_dir)
    root, mine = params.curate.staging_dir, str(out.resolve()).encode()
    for stale in root.iterdir() if root.is_dir() else ():
        owner = stale / _OWNER
        if _STAGING_NAME.match(stale.name) and (stale == staging_dir(params) or owner.is_file()
                                                and owner.read_bytes() == mine):
            shutil.rmtree(stale, ignore_errors=True)
    return out


def validate_curated(params: Params, partial: Path) -> list[dict]:
    """Run the GX suites on every output folder's manifest; writes validation.json beside the data."""
    from core.data.validation import validate

    cfg = params.curate
    tables = manifests(partial)
    common = dict(image_size=cfg.image_size, caption_min_chars=cfg.caption.min_chars,
                  caption_max_chars=cfg.caption.max_chars, sha256_unique_mostly=cfg.validation.sha256_unique_mostly)
    reports = []
    for group, table in tables.items():
        df = table.to_pandas()
        reports.append(validate(df, "curated_manifest", common, group))
        if group.startswith("eval/"):
            n_classes = len(json.loads((partial / group / "classes.json").read_text())["classnames"])
            reports.append(validate(df, "labelled_eval", {"max_class_index": n_classes - 1}, group))
    atomic_write_json(partial / "validation.json", {"success": all(r["success"] for r in reports), "reports": reports})
    return reports


def read_stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text()) | {"out_dir": str(out)}


def stats_rows(stats: dict) -> list[dict]:
    """One row per source, for a Prefect table artifact."""
    return [{"source": name, "seen": s["seen"], "written": s["written"],
             "quarantined": ", ".join(f"{k}={v}" for k, v in s["quarantined"].items()) or "-"}
            for name, s in stats["sources"].items()]


def run_sequential(params: Params) -> dict:
    """The whole stage in this process, without orchestration (benchmarks, test fixtures)."""
    results = [process_partition(params, p) for p in plan_partitions(params)]
    partial = finalize(params, results)
    from core.data.validation import raise_on_failure

    raise_on_failure(validate_curated(params, partial))
    return read_stats(publish(params, partial))
