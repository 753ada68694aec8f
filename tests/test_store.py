"""LogStore in one process: round trips, readers, schema checks, duplicates, errors."""

from __future__ import annotations

import itertools
import json
import multiprocessing

import numpy as np
import pytest
import store_writer
import tensorstore as ts
import torch
from torch import nn

import logix_func as lf
from logix_func.store import (
    DuplicateIdError,
    LogStore,
    NotAStoreError,
    SchemaError,
    StoreError,
    StoreIOError,
    StoreSchema,
    WriterConflictError,
)

LAYERS = {"fc1": (3, 5), "fc2": (7,)}
_urls = itertools.count()


def memory_url() -> str:
    return f"memory://test-store-{next(_urls)}"


def random_bits(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Arbitrary finite bit patterns of ``dtype`` (subnormals and -0 included; the store
    refuses NaN and infinities, which become 0 here)."""
    g = torch.Generator().manual_seed(seed)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    info = torch.iinfo(bits[dtype])
    raw = torch.randint(info.min, info.max, (n, *shape), generator=g, dtype=torch.int64)
    x = raw.to(bits[dtype]).view(dtype)
    return torch.where(x.isfinite(), x, torch.zeros_like(x))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {4: torch.int32, 2: torch.int16}
    return a.dtype == b.dtype and torch.equal(
        a.view(ints[a.element_size()]), b.view(ints[b.element_size()])
    )


def make_rows(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    return {
        name: random_bits(n, shape, dtype, seed + k)
        for k, (name, shape) in enumerate(LAYERS.items())
    }


def id_list(kind: str, n: int) -> list:
    return (
        [f"sample/{i:04d}/é" for i in range(n)] if kind == "str" else [7 * i - 50 for i in range(n)]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ids_kind", ["int", "str"])
@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_round_trip_is_exact(tmp_path, dtype, ids_kind, codec):
    n = 45
    rows, ids = make_rows(n, dtype), id_list(ids_kind, n)
    schema = StoreSchema(layers=LAYERS, dtype=dtype, ids=ids_kind, codec=codec, chunk_rows=8)
    with LogStore.create(str(tmp_path / "s"), schema) as store:
        for a, b in [(0, 3), (3, 20), (20, 21), (21, 45)]:  # crosses chunks, a flush mid-chunk
            store.append(ids[a:b], {k: v[a:b] for k, v in rows.items()})
            if b == 21:
                store.flush()
    store = LogStore.open(str(tmp_path / "s"))
    assert len(store) == n
    got_ids = store.ids()
    assert (got_ids.tolist() if ids_kind == "int" else got_ids) == ids
    chunks = list(store.iter_chunks(chunk_rows=8))
    assert [len(c[0]) for c in chunks] == [8, 8, 8, 8, 8, 5]
    for name in LAYERS:
        assert same_bits(torch.cat([c[1][name] for c in chunks]), rows[name])
    order = [44, 0, 17, 3, 3]
    picked = store.read([ids[i] for i in order])
    for name in LAYERS:
        assert same_bits(picked[name], rows[name][order])


def test_bfloat16_is_stored_as_bfloat16_bits(tmp_path):
    rows = {"g": random_bits(8, (4,), torch.bfloat16, 0)}
    url = str(tmp_path / "s")
    with LogStore.create(url, StoreSchema.from_rows(rows, codec="none", chunk_rows=8)) as store:
        store.append(range(8), rows)
    array = tmp_path / "s" / "shards" / "0" / "layers" / "g"
    assert json.loads((array / "zarr.json").read_text())["data_type"] == "bfloat16"
    chunk = (array / "c.0.0").read_bytes()  # codec "none": the raw little-endian bits, crc32c
    assert chunk[:-4] == rows["g"].view(torch.int16).numpy().astype("<i2").tobytes()
    assert len(chunk) == 8 * 4 * 2 + 4


def test_schema_from_rows_and_attributes():
    rows = {"a": torch.zeros(2, 3, 4), "b": torch.zeros(2, 6)}
    schema = StoreSchema.from_rows(rows, data_ids=["x", "y"], spec={"rank": 3})
    assert schema.layers == {"a": (3, 4), "b": (6,)} and schema.ids == "str"
    assert schema.row_sizes == {"a": 12, "b": 6} and schema.dtype == torch.float32
    assert StoreSchema.from_json(schema.to_json()) == schema
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert lf.model_fingerprint(model) == {"0.weight": [4, 3], "0.bias": [4], "2.weight": [2, 4]}
    url = memory_url()
    schema = StoreSchema(layers={"a": (2,)}, fingerprint=lf.model_fingerprint(model))
    LogStore.create(url, schema).close()
    store = LogStore.open(url)
    assert store.schema == schema
    assert store.attrs["version"] == lf.__version__ and store.attrs["created"][:2] == "20"
    with pytest.raises(SchemaError, match="mix dtypes"):
        StoreSchema.from_rows({"a": torch.zeros(1, 2), "b": torch.zeros(1, 2, dtype=torch.float16)})
    with pytest.raises(SchemaError, match="JSON"):
        StoreSchema(layers={"a": (2,)}, spec={"matrix": torch.zeros(2)})
    with pytest.raises(SchemaError, match="float64"):
        StoreSchema(layers={"a": (2,)}, dtype=torch.float64)


def test_append_schema_mismatch_errors():
    rows = make_rows(4)
    store = LogStore.create(memory_url(), StoreSchema(layers=LAYERS, spec={"rank": 4}))
    with pytest.raises(SchemaError, match=r"missing \['fc2'\], unknown \['fc3'\]"):
        store.append(range(4), {"fc1": rows["fc1"], "fc3": rows["fc2"]})
    with pytest.raises(SchemaError, match=r"'fc2': shape \(4, 8\), expected \(4, 7\)"):
        store.append(range(4), {**rows, "fc2": torch.zeros(4, 8)})
    with pytest.raises(SchemaError, match=r"'fc1': dtype torch.float16 but the store holds"):
        store.append(range(4), {**rows, "fc1": rows["fc1"].half()})
    with pytest.raises(SchemaError, match=r"shape \(4, 3, 5\), expected \(3, 3, 5\)"):
        store.append(range(3), rows)
    with pytest.raises(SchemaError, match="int data ids"):
        store.append(["a", "b", "c", "d"], rows)
    with pytest.raises(SchemaError, match="integer array"):
        store.append(torch.arange(4.0), rows)
    assert store.append(range(4), rows) == 4


def test_reopen_with_other_schema_names_the_difference():
    url = memory_url()
    LogStore.create(url, StoreSchema(layers=LAYERS, spec={"rank": 4, "seed": 0})).close()
    with pytest.raises(SchemaError, match=r"spec: store has \{'rank': 4, 'seed': 0\}, got"):
        LogStore.create(url, StoreSchema(layers=LAYERS, spec={"rank": 4, "seed": 1}), exist_ok=True)
    with pytest.raises(SchemaError, match="dtype: store has 'float32', got 'bfloat16'"):
        LogStore.create(
            url,
            StoreSchema(layers=LAYERS, dtype=torch.bfloat16, spec={"rank": 4, "seed": 0}),
            exist_ok=True,
        )
    with pytest.raises(StoreError, match="already holds a store"):
        LogStore.create(url, StoreSchema(layers=LAYERS, spec={"rank": 4, "seed": 0}))
    same = LogStore.create(
        url, StoreSchema(layers=LAYERS, spec={"rank": 4, "seed": 0}), exist_ok=True
    )
    same.close()


def test_duplicate_ids_are_named_or_skipped():
    url = memory_url()
    rows = make_rows(6)
    first = {k: v[:3] for k, v in rows.items()}
    with LogStore.create(url, StoreSchema(layers=LAYERS, ids="str")) as store:
        store.append(["a", "b", "c"], first)
        with pytest.raises(DuplicateIdError, match="repeated within the batch: 'x'"):
            store.append(["x", "x", "y"], first)
        with pytest.raises(DuplicateIdError, match="already in .*: 'b', 'c'"):
            store.append(["b", "c", "d"], first)
    store = LogStore.open(url, "a")  # ids committed by an earlier writer count too
    with pytest.raises(DuplicateIdError, match="'a'"):
        store.append(["a", "e", "f"], first)
    store.close()
    with LogStore.open(url, "a", on_duplicate="skip") as store:
        assert store.append(["a", "e", "f"], {k: v[3:] for k, v in rows.items()}) == 2
    store = LogStore.open(url)
    assert store.ids() == ["a", "b", "c", "e", "f"]
    assert same_bits(store.read(["e", "f"])["fc1"], rows["fc1"][4:])
    with pytest.raises(KeyError, match="'zz'"):
        store.read(["a", "zz"])


def test_committed_ids_resume_and_snapshots():
    url, rows = memory_url(), make_rows(30)
    schema = StoreSchema(layers=LAYERS, chunk_rows=4)
    writer = LogStore.create(url, schema)
    writer.append(range(10), {k: v[:10] for k, v in rows.items()})
    reader = LogStore.open(url)
    assert len(reader) <= 8  # at most the two full chunks; row 8, 9 wait for a flush
    writer.flush()
    assert len(writer) == 10 and writer.committed_ids() == set(range(10))
    reader.refresh()
    assert len(reader) == 10
    writer.close()
    resumed = LogStore.open(url, "a")
    todo = [i for i in range(30) if i not in resumed.committed_ids()]
    resumed.append(todo, {k: v[10:] for k, v in rows.items()})
    resumed.close()
    ids, chunk = zip(*LogStore.open(url).iter_chunks(layers=["fc2"], chunk_rows=7), strict=True)
    assert torch.cat(ids).tolist() == list(range(30))
    assert set(chunk[0]) == {"fc2"} and same_bits(torch.cat([c["fc2"] for c in chunk]), rows["fc2"])


def test_writers_are_shards_read_in_writer_order():
    url, rows = memory_url(), make_rows(9)
    schema = StoreSchema(layers=LAYERS, chunk_rows=2)
    parts = {2: [0, 1, 2], 0: [3, 4], 1: [5, 6, 7, 8]}
    stores = {w: LogStore.create(url, schema, writer=w, exist_ok=True) for w in parts}
    for w, idx in parts.items():
        stores[w].append([10 * i for i in idx], {k: v[idx] for k, v in rows.items()})
    for store in stores.values():
        store.close()
    store = LogStore.open(url)
    order = parts[0] + parts[1] + parts[2]
    assert store.ids().tolist() == [10 * i for i in order]
    assert same_bits(store.read([10 * i for i in order])["fc1"], rows["fc1"][order])
    assert [len(ids) for ids, _ in store.iter_chunks(chunk_rows=3)] == [2, 3, 1, 3]


@pytest.mark.parametrize("where", ["memory", "file"])
def test_same_writer_id_twice_is_refused_before_writing(tmp_path, where):
    url, rows = memory_url() if where == "memory" else str(tmp_path / "s"), make_rows(8)
    first = LogStore.create(url, StoreSchema(layers=LAYERS, chunk_rows=4), writer=3)
    first.append(range(4), {k: v[:4] for k, v in rows.items()})
    first.flush()
    marker = LogStore.open(url)._root.read_json("commits/3.json")
    with pytest.raises(
        WriterConflictError,
        match="writer 3 of .* in use by another LogStore of this process.*close",
    ):
        LogStore.open(url, "a", writer=3)
    assert LogStore.open(url)._root.read_json("commits/3.json") == marker  # nothing written
    first.append(range(4, 8), {k: v[4:] for k, v in rows.items()})
    first.close()  # gives the writer id up
    with LogStore.open(url, "a", writer=3) as again:
        assert again.committed_ids() == set(range(8))
    assert same_bits(LogStore.open(url).read(range(8))["fc1"], rows["fc1"])


@pytest.mark.parametrize("writer", [True, -1, 1.0, "0"])
def test_writer_ids_are_validated(writer):
    url = memory_url()
    with pytest.raises(ValueError, match="writer must be a non-negative int"):
        LogStore.create(url, StoreSchema(layers=LAYERS), writer=writer)
    with pytest.raises(NotAStoreError):  # refused before anything was written
        LogStore.open(url)
    LogStore.create(url, StoreSchema(layers=LAYERS)).close()
    with pytest.raises(ValueError, match="writer must be a non-negative int"):
        LogStore.open(url, "a", writer=writer)
    assert LogStore.open(url)._root.writers() == [0]


def test_open_what_is_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="no logix_func store"):
        LogStore.open(str(tmp_path))
    with pytest.raises(NotAStoreError, match="no logix_func store"):
        LogStore.open(str(tmp_path / "missing"))
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "arr")}}
    ts.open(spec, create=True, dtype=ts.float32, shape=[4]).result()
    with pytest.raises(NotAStoreError, match="holds a zarr array, not a logix_func store"):
        LogStore.open(str(tmp_path / "arr"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("not json")
    with pytest.raises(NotAStoreError, match="not JSON"):
        LogStore.open(str(tmp_path / "junk"))
    with pytest.raises(StoreError, match="not a tensorstore kvstore URL"):
        LogStore.open("nosuchscheme://bucket/x")
    reader = LogStore.create(memory_url(), StoreSchema(layers=LAYERS))
    reader.close()
    with pytest.raises(StoreError, match="open for reading"):
        reader.append([0], make_rows(1))


def test_files_left_by_a_killed_write_do_not_corrupt_the_next(tmp_path):
    """A writer killed mid-write leaves a temporary file; a longer one must not leak its tail."""
    url, rows = tmp_path / "s", make_rows(8)
    schema = StoreSchema(layers=LAYERS, chunk_rows=4, codec="none")
    with LogStore.create(str(url), schema) as store:
        store.append(range(4), {k: v[:4] for k, v in rows.items()})
    stale = b"x" * 10_000  # what the default tensorstore lock file could hold after a kill
    (url / "commits" / "0.json.__lock").write_bytes(stale)
    (url / "shards" / "0" / "layers" / "fc1" / "c.1.0.__lock").write_bytes(stale)
    with LogStore.open(str(url), "a") as store:
        store.append(range(4, 8), {k: v[4:] for k, v in rows.items()})
    assert json.loads((url / "commits" / "0.json").read_text())["rows"] == 8
    store = LogStore.open(str(url))
    assert same_bits(store.read(range(8))["fc1"], rows["fc1"])


def test_missing_chunk_is_an_error_not_zeros(tmp_path):
    url, rows = tmp_path / "s", make_rows(8)
    with LogStore.create(str(url), StoreSchema(layers=LAYERS, chunk_rows=4)) as store:
        store.append(range(8), rows)
    (url / "shards" / "0" / "layers" / "fc2" / "c.1.0").unlink()
    store = LogStore.open(str(url))
    assert same_bits(store.read([0, 3])["fc2"], rows["fc2"][[0, 3]])
    with pytest.raises(StoreIOError, match="missing"):
        store.read([5])
    with pytest.raises(StoreIOError, match="missing"):
        list(store.iter_chunks())


def test_path_under_a_file_raises(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreIOError, match="Not a directory"):
        LogStore.create(str(tmp_path / "file" / "store"), StoreSchema(layers=LAYERS))


def _check_dataset(url: str, ids: list, rows: dict, **loader_kw) -> None:
    store = LogStore.open(url)
    loader = torch.utils.data.DataLoader(store.dataset(), batch_size=4, **loader_kw)
    got_ids, got = [], {k: [] for k in rows}
    for batch_ids, batch_rows in loader:
        got_ids += batch_ids.tolist() if torch.is_tensor(batch_ids) else list(batch_ids)
        for k, v in batch_rows.items():
            got[k].append(v)
    assert got_ids == ids
    for k in rows:
        assert same_bits(torch.cat(got[k]), rows[k])


def test_dataset_in_dataloader_workers(tmp_path):
    url, rows, ids = str(tmp_path / "s"), make_rows(21, torch.bfloat16), id_list("str", 21)
    schema = StoreSchema(layers=LAYERS, dtype=torch.bfloat16, ids="str", chunk_rows=4)
    with LogStore.create(url, schema) as store:
        store.append(ids, rows)
    _check_dataset(url, ids, rows)  # in this process
    # workers in fresh processes (forkserver, like spawn, pickles the dataset over)
    _check_dataset(url, ids, rows, num_workers=2, multiprocessing_context=store_writer.forkserver())
    dataset = LogStore.open(url).dataset(layers=["fc2"])
    sample_id, sample = dataset[-1]
    assert sample_id == ids[-1] and set(sample) == {"fc2"}
    assert same_bits(sample["fc2"], rows["fc2"][-1])


def test_dataset_in_a_forked_process_fails_clearly(tmp_path):
    url = str(tmp_path / "s")
    with LogStore.create(url, StoreSchema(layers=LAYERS)) as store:
        store.append(range(8), make_rows(8))
    dataset = LogStore.open(url).dataset()
    dataset[0]  # opened in this process, so a forked copy must refuse
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=store_writer.item_in_child, args=(dataset, queue))
    child.start()
    kind, message = queue.get(timeout=60)
    child.join(timeout=60)
    assert kind == "RuntimeError" and "multiprocessing_context='spawn'" in message


def test_empty_store_and_empty_reads():
    url = memory_url()
    LogStore.create(url, StoreSchema(layers=LAYERS)).close()
    store = LogStore.open(url)
    assert len(store) == 0 and list(store.iter_chunks()) == [] and store.committed_ids() == set()
    assert store.ids().shape == (0,)
    assert store.read([])["fc1"].shape == (0, 3, 5)
    with pytest.raises(KeyError):
        store.read([1])


def test_unclosed_writer_warns():
    store = LogStore.create(memory_url(), StoreSchema(layers=LAYERS))
    store.append([1], make_rows(1))
    with pytest.warns(ResourceWarning, match="not closed"):
        store.__del__()
    store.close()


def test_numpy_and_tensor_ids_agree():
    url, rows = memory_url(), make_rows(6)
    with LogStore.create(url, StoreSchema(layers=LAYERS)) as store:
        store.append(np.arange(3, dtype=np.int32), {k: v[:3] for k, v in rows.items()})
        store.append(torch.arange(3, 6), {k: v[3:] for k, v in rows.items()})
    assert LogStore.open(url).ids().tolist() == list(range(6))


def test_all_zero_chunks_are_stored(tmp_path):
    """A chunk equal to the fill value (zero rows; the padded ids chunk of the one id 0) is
    stored like any other: a missing chunk stays an error."""
    url = str(tmp_path / "s")
    with LogStore.create(url, StoreSchema(layers={"g": (4,)}, chunk_rows=4)) as store:
        store.append([0], {"g": torch.zeros(1, 4)})
    store = LogStore.open(url)
    assert store.ids().tolist() == [0]
    assert torch.equal(store.read([0])["g"], torch.zeros(1, 4))
    with LogStore.open(url, "a") as store:
        store.append(range(1, 9), {"g": torch.zeros(8, 4)})
    ids, rows = zip(*LogStore.open(url).iter_chunks(), strict=True)
    assert torch.cat(ids).tolist() == list(range(9))
    assert torch.equal(torch.cat([r["g"] for r in rows]), torch.zeros(9, 4))
