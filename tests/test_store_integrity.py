"""LogStore integrity: checksums, damaged markers and metadata, stray files, duplicate ids
across writers, leases, and the memory of committed ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import torch

import logix_func as lf
from logix_func.store import (
    CorruptStoreError,
    DuplicateIdError,
    LogStore,
    SchemaError,
    StoreSchema,
    WriterConflictError,
    lock,
)

LAYERS = {"fc1": (3, 5), "fc2": (7,)}


def rows_for(ids: list[int]) -> dict[str, torch.Tensor]:
    """Rows that depend on the data id only."""
    i = torch.tensor(ids, dtype=torch.float32)[:, None]
    return {
        name: (torch.cos(i * 0.37 + torch.arange(n) * (k + 1.0)) * (1 + i)).view(-1, *shape)
        for k, (name, shape) in enumerate(LAYERS.items())
        for n in [int(np.prod(shape))]
    }


def write(url: str, ids: list[int], writer: int = 0, **schema_kw) -> None:
    schema = StoreSchema(layers=LAYERS, chunk_rows=4, **schema_kw)
    with LogStore.create(url, schema, writer=writer, exist_ok=True) as store:
        store.append(ids, rows_for(ids))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc"])
@pytest.mark.parametrize("array", ["layers/fc1", "ids"])
def test_a_flipped_byte_in_a_chunk_is_an_error_naming_the_file(tmp_path, codec, array):
    url = str(tmp_path / "s")
    write(url, list(range(8)), codec=codec)
    write(url, list(range(8, 12)), writer=1, codec=codec)
    damaged = tmp_path / "s" / "shards" / "0" / array / "c.1.0"
    flip_byte(damaged)
    store = LogStore.open(url)
    with pytest.raises(CorruptStoreError, match=f"{damaged}.*Restore the file"):
        list(store.iter_chunks())
    if array == "ids":  # ids are read to look rows up
        with pytest.raises(CorruptStoreError, match=str(damaged)):
            store.read([0])
        return
    with pytest.raises(CorruptStoreError, match=str(damaged)):
        store.read([5])
    expected = rows_for([0, 3, 8, 11])  # other chunks and other shards stay readable
    got = store.read([0, 3, 8, 11])
    for name in LAYERS:
        assert torch.equal(got[name], expected[name])


def test_damaged_commit_markers_are_errors_naming_the_file(tmp_path):
    url = tmp_path / "s"
    write(str(url), list(range(8)))
    write(str(url), list(range(8, 12)), writer=1)
    marker = url / "commits" / "1.json"
    good = marker.read_text()
    marker.write_text(good.replace('"rows": 4', '"rows": 5'))  # a flipped digit
    with pytest.raises(CorruptStoreError, match=f"{marker} is damaged.*checksum"):
        len(LogStore.open(str(url)))
    marker.write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(CorruptStoreError, match=f"{marker} is not valid JSON.*shards/1/ out"):
        len(LogStore.open(str(url)))
    with pytest.raises(CorruptStoreError, match=str(marker)):
        LogStore.open(str(url), "a", writer=1)
    marker.rename(tmp_path / "1.json")  # what the error advises: the other writers stay readable
    assert LogStore.open(str(url)).ids().tolist() == list(range(8))


def test_stray_files_in_commits_are_ignored(tmp_path):
    url = tmp_path / "s"
    write(str(url), list(range(6)))
    for name in ("².json", "007.json", "1.json.bak", "notes.txt", "-1.json"):
        (url / "commits" / name).write_text("{}")
    assert LogStore.open(str(url)).ids().tolist() == list(range(6))
    write(str(url), list(range(6, 9)), writer=2)
    assert LogStore.open(str(url)).ids().tolist() == list(range(9))


def test_crafted_sizes_are_errors_not_allocations(tmp_path):
    url = tmp_path / "s"
    write(str(url), list(range(8)))
    meta_path = url / "shards" / "0" / "layers" / "fc2" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [1 << 40, 7]
    meta_path.write_text(json.dumps(meta))
    store = LogStore.open(str(url))
    with pytest.raises(CorruptStoreError, match="fc2 does not match the store's schema"):
        store.read([0])
    with pytest.raises(CorruptStoreError, match="fc2 does not match"):
        LogStore.open(str(url), "a")
    group_path = url / "zarr.json"
    group = json.loads(group_path.read_text())
    group["attributes"]["logix_func"]["schema"]["chunk_rows"] = 1 << 40
    group_path.write_text(json.dumps(group))
    with pytest.raises(CorruptStoreError, match="zarr.json holds no valid schema.*chunk_rows"):
        LogStore.open(str(url))


def test_a_store_without_checksums_still_opens(tmp_path):
    """A store in the format written before checksums (no crc32c codec, markers without
    ``crc32``), built here with tensorstore alone."""
    url = tmp_path / "old"
    schema = StoreSchema(layers=LAYERS, chunk_rows=4, codec="zstd")
    info = {"schema": schema.to_json(), "version": "0.1.0", "created": "2026-01-01T00:00:00"}
    group = {"zarr_format": 3, "node_type": "group", "attributes": {"logix_func": info}}
    url.mkdir()
    (url / "zarr.json").write_text(json.dumps(group))
    ids, rows = list(range(6)), rows_for(list(range(6)))
    arrays = {"ids": (np.asarray(ids, np.int64)[:, None], "int64")}
    arrays |= {f"layers/{k}": (v.reshape(6, -1).numpy(), "float32") for k, v in rows.items()}
    for path, (data, dtype) in arrays.items():
        codecs = [
            {"name": "bytes", "configuration": {"endian": "little"}},
            {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
        ]
        metadata = {
            "shape": [1 << 40, data.shape[1]],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, data.shape[1]]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "data_type": dtype,
            "codecs": codecs,
            "fill_value": 0,
        }
        kvstore = {"driver": "file", "path": str(url / "shards" / "0" / path)}
        spec = {"driver": "zarr3", "kvstore": kvstore, "metadata": metadata}
        array = ts.open(spec, create=True).result()
        array[0:8].write(np.concatenate([data, np.zeros((2, data.shape[1]), data.dtype)])).result()
    (url / "commits").mkdir()
    (url / "commits" / "0.json").write_text(json.dumps({"rows": 6, "owner": "x"}))
    got = LogStore.open(str(url)).read(ids)
    assert all(torch.equal(got[k], rows[k]) for k in LAYERS)
    write(str(url), list(range(6, 10)))  # appends to the old shard, in its own format
    got = LogStore.open(str(url)).read(range(10))
    assert all(torch.equal(got[k], rows_for(list(range(10)))[k]) for k in LAYERS)


def test_duplicate_ids_across_writers_open_but_refuse_scoring(tmp_path):
    url, schema = str(tmp_path / "s"), StoreSchema(layers=LAYERS, chunk_rows=4)
    writers = [LogStore.create(url, schema, writer=w, exist_ok=True) for w in (0, 1)]
    for writer, ids in zip(writers, [list(range(10)), list(range(6, 14))], strict=True):
        writer.append(ids, rows_for(ids))  # 6..9 logged by both: neither saw the other's
        writer.close()
    with LogStore.open(url, "a", writer=2) as store:  # opens for appending / repair
        assert store.committed_ids() == set(range(14))
        store.append([20], rows_for([20]))
    store = LogStore.open(url)
    query = {k: v[:2] * 0.5 for k, v in rows_for([3, 4]).items()}
    named = r"by writers \[0, 1\]: 6, 7, 8, 9.*on_duplicate='skip'"
    with pytest.raises(DuplicateIdError, match=named) as error:
        lf.influence(query, store)
    assert error.value.ids == [6, 7, 8, 9]
    with pytest.raises(DuplicateIdError, match=named):
        lf.self_influence(store)
    with pytest.raises(DuplicateIdError, match=named):
        lf.top_k(lf.influence_chunks(query, store), 3)
    with pytest.raises(DuplicateIdError, match="cannot read"):
        store.read([1, 7])
    assert torch.equal(store.read([1, 2])["fc2"], rows_for([1, 2])["fc2"])
    fixed_url = str(tmp_path / "fixed")  # the repair the error describes
    with LogStore.create(fixed_url, store.schema, on_duplicate="skip") as fixed:
        for ids, rows in store.iter_chunks():
            fixed.append(ids, rows)
    fixed = LogStore.open(fixed_url)
    ids = sorted(fixed.ids().tolist())
    assert ids == [*range(14), 20]
    rows = rows_for(fixed.ids().tolist())
    expected = sum(query[k].flatten(1) @ rows[k].flatten(1).T for k in LAYERS)
    assert torch.allclose(lf.influence(query, fixed), expected, rtol=1e-5, atol=1e-4)


def test_create_is_conditional_on_object_stores_too():
    """The root ``zarr.json`` is written only where none exists (``memory://`` as an object
    store); racing creates across processes are tested on local files."""
    url = "memory://create-once"
    LogStore.create(url, StoreSchema(layers={"a": (4,)})).close()
    with pytest.raises(SchemaError, match=r"layers: store has \{'a': \[4\]\}"):
        LogStore.create(url, StoreSchema(layers={"a": (5,)}), exist_ok=True)
    root = LogStore.open(url)._root
    assert not root.create_json("zarr.json", {"other": 1})
    assert root.read_json("zarr.json")[0]["attributes"]["logix_func"]["schema"]["layers"] == {
        "a": [4]
    }
    assert root.create_json("elsewhere.json", {"x": 1}) and root.read_json("elsewhere.json")[0]


def test_temp_files_of_killed_writes_are_removed_by_their_writer_only(tmp_path):
    url = tmp_path / "s"
    write(str(url), list(range(4)), writer=0)
    write(str(url), list(range(4, 8)), writer=1)
    own = [
        url / "commits" / "0.json_1a2b3c4d5e6f7a8b.__lock",
        url / "shards" / "0" / "layers" / "fc1" / "c.1.0_0123456789abcdef.__lock",
    ]
    other = [
        url / "commits" / "1.json_1a2b3c4d5e6f7a8b.__lock",
        url / "commits" / "10.json_1a2b3c4d5e6f7a8b.__lock",
        url / "shards" / "1" / "ids" / "c.0.0_0123456789abcdef.__lock",
    ]
    for path in own + other:
        path.write_bytes(b"partial")
    LogStore.open(str(url), "a", writer=0).close()
    assert not any(p.exists() for p in own) and all(p.exists() for p in other)


def test_lease_is_kept_by_a_live_holder_and_taken_after_it_stops(monkeypatch):
    """memory:// stores (like object stores) use a lease in the commit marker."""
    monkeypatch.setattr(lock, "LEASE_SECONDS", 0.4)
    url = "memory://lease-store"
    holder = LogStore.create(url, StoreSchema(layers=LAYERS, chunk_rows=4))
    holder.append(range(4), rows_for(list(range(4))))
    holder.flush()
    time.sleep(1.0)  # more than a lease: renewed meanwhile
    with pytest.raises(WriterConflictError, match="writer 0 of memory://lease-store is in use"):
        LogStore.open(url, "a")
    holder._shard.renewal.stop.set()  # the holder stops renewing, as a killed process would
    holder.append(range(4, 6), rows_for([4, 5]))  # not committed yet
    time.sleep(0.5)
    with LogStore.open(url, "a") as taker:
        assert taker.committed_ids() == set(range(4))
        taker.append(range(10, 12), rows_for([10, 11]))
    with pytest.raises(WriterConflictError, match="marker changed under us"):
        holder.flush()  # the old holder cannot commit over the new one
    store = LogStore.open(url)
    assert store.ids().tolist() == [0, 1, 2, 3, 10, 11]
    got = store.read(store.ids())
    assert all(torch.equal(got[k], rows_for([0, 1, 2, 3, 10, 11])[k]) for k in LAYERS)


def test_committed_ids_is_a_set_of_sorted_ids():
    url = "memory://committed-ids"
    ids = [5, -3, 2**40, 17]
    with LogStore.create(url, StoreSchema(layers={"g": (2,)})) as store:
        store.append(ids, {"g": torch.zeros(4, 2)})
    done = LogStore.open(url).committed_ids()
    assert done == set(ids) and set(ids) == done and len(done) == 4
    assert list(done) == sorted(ids)
    assert 17 in done and np.int64(5) in done and torch.tensor(-3) in done
    assert 6 not in done and "5" not in done and 2**70 not in done and True not in done
    assert set(range(20)) - done == set(range(20)) - {5, 17}
    assert done.contains(np.array([2, 5], np.int64)).tolist() == [False, True]
    with LogStore.create("memory://committed-str", StoreSchema(layers={"g": (2,)}, ids="str")) as s:
        s.append(["a", "bé"], {"g": torch.zeros(2, 2)})
    done = LogStore.open("memory://committed-str").committed_ids()
    assert done == {"a", "bé"} and "bé" in done and "b" not in done and 1 not in done
