import pytest

from tasks.config import CsvSource, WebdatasetSource
from core.data.sources import Partition, SourceError, expand_urls, plan, read_tar
from tests.conftest import png_bytes, random_image, write_tar

WEB = WebdatasetSource(kind="webdataset", name="web", urls="unused")


def test_truncated_tar_keeps_complete_samples(tmp_path):
    path = tmp_path / "a.tar"
    samples = [{"__key__": f"{i:09d}", "jpg": png_bytes(random_image(i), "JPEG"), "txt": b"caption"} for i in range(3)]
    write_tar(path, samples, truncate_last_at=50)
    recs = list(read_tar(WEB, Partition(0, "web", "train", url=str(path), shard="a")))
    assert [r.key for r in recs] == ["web_a_000000000", "web_a_000000001", "web_a_000000002"]
    assert [r.rejected is None for r in recs] == [True, True, False]
    assert recs[-1].rejected.reason == "truncated_tar_member"


def test_tar_sample_without_image_is_rejected(tmp_path):
    path = tmp_path / "a.tar"
    write_tar(path, [{"__key__": "000000001", "txt": b"only a caption"}])
    (rec,) = read_tar(WEB, Partition(0, "web", "train", url=str(path), shard="a"))
    assert rec.rejected.reason == "missing_image" and rec.caption == "only a caption"


def test_expand_urls(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert len(expand_urls(str(tmp_path / "{00000..00002}.tar"))) == 3
    assert len(expand_urls(str(tmp_path / "*.tar"))) == 3
    with pytest.raises(SourceError, match="00003.tar"):
        expand_urls(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(SourceError, match="match no file"):
        expand_urls(str(tmp_path / "*.tgz"))


def test_csv_without_the_columns_is_named(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\na.png,hello\n")
    with pytest.raises(SourceError, match=r"lacks column\(s\) \['image', 'caption'\]; header is \['filepath', 'title'\]"):
        plan([CsvSource(kind="csv", name="c", path=path)], 10)
    with pytest.raises(SourceError, match="CSV not found"):
        plan([CsvSource(kind="csv", name="c", path=tmp_path / "nope.csv")], 10)


def test_plan_cuts_partitions(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n" + "".join(f"{i}.png,c{i}\n" for i in range(25)))
    for i in range(2):
        (tmp_path / f"{i}.tar").write_bytes(b"")
    parts = plan([CsvSource(kind="csv", name="c", path=path),
                  WebdatasetSource(kind="webdataset", name="w", urls=str(tmp_path / "*.tar"))], 10)
    assert [(p.source, p.start, p.stop) for p in parts[:3]] == [("c", 0, 10), ("c", 10, 20), ("c", 20, 25)]
    assert [p.url.endswith(".tar") for p in parts[3:]] == [True, True]
    assert [p.index for p in parts] == list(range(5))
