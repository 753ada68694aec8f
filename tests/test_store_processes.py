"""LogStore across processes: writers killed with SIGKILL, concurrent writers, OS errors."""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import store_writer
import torch
from store_writer import rows_for

from logix_func.store import LogStore, StoreIOError, StoreSchema, WriterConflictError


def check_store(url: str, allowed: set[int]) -> list[int]:
    """Every committed id appears once, comes from ``allowed``, and has its exact row."""
    store = LogStore.open(url)
    ids = store.ids().tolist()
    assert len(ids) == len(store)
    assert len(ids) == len(set(ids)), (
        f"repeated ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    )
    assert set(ids) <= allowed, f"unexpected ids: {sorted(set(ids) - allowed)[:10]}"
    if ids:
        expected, got = rows_for(ids), store.read(ids)
        for name in expected:
            same = (got[name].view(torch.int16) == expected[name].view(torch.int16)).flatten(1)
            wrong = [i for i, ok in zip(ids, same.all(1).tolist(), strict=True) if not ok]
            assert not wrong, f"{name}: rows differ for ids {wrong[:10]} ({len(wrong)} in all)"
    return ids


def test_writer_killed_at_random_points_resumes_without_duplicates_or_gaps(tmp_path):
    ctx = store_writer.forkserver()
    url, ids = str(tmp_path / "killed"), list(range(6000))
    rng = random.Random(0)
    kills = runs = 0
    while kills < 24 and runs < 100:
        ready = ctx.Event()
        args = (url, ids, 0, rng.choice([1, 5, 16, 37]), rng.choice([0, 1, 3]), 0.01, ready)
        child = ctx.Process(target=store_writer.write_ids, args=args)
        child.start()
        while not ready.wait(0.05) and child.is_alive():  # kill at a random point after open
            pass
        child.join(timeout=rng.uniform(0.0, 0.2))
        child.kill()  # SIGKILL: no cleanup, no flush
        child.join()
        runs += 1
        kills += child.exitcode == -signal.SIGKILL
        if Path(url, "zarr.json").exists():
            check_store(url, set(ids))
    assert kills >= 20, f"only {kills} of {runs} runs were killed before finishing"
    partial = len(check_store(url, set(ids)))
    assert 0 < partial < len(ids)  # the kills left work to resume
    child = ctx.Process(target=store_writer.write_ids, args=(url, ids, 0, 37, 0, 0.0))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    clean_url = str(tmp_path / "clean")
    store_writer.write_ids(clean_url, ids, 0, 16, 0, 0.0)
    assert sorted(check_store(url, set(ids))) == ids
    resumed, clean = LogStore.open(url), LogStore.open(clean_url)
    for name in store_writer.LAYERS:
        a, b = resumed.read(ids)[name], clean.read(ids)[name]
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_two_concurrent_writers_union(tmp_path):
    ctx = store_writer.forkserver()
    url = str(tmp_path / "shared")
    parts = {0: list(range(0, 700, 2)), 1: list(range(1, 700, 2))}  # even and odd ids
    children = [
        ctx.Process(target=store_writer.write_ids, args=(url, part, writer, 9, 4, 0.0))
        for writer, part in parts.items()
    ]
    for child in children:  # both race to create the store
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    ids = check_store(url, set(range(700)))
    assert ids == parts[0] + parts[1]  # writer 0's rows, then writer 1's, each in append order


def test_full_disk_raises_instead_of_hanging(tmp_path):
    ctx = store_writer.forkserver()
    queue = ctx.Queue()
    limit = 64 << 10  # files may not grow past 64 KiB in the child; its chunks are 8 MiB
    child = ctx.Process(
        target=store_writer.write_with_file_limit, args=(str(tmp_path / "s"), limit, queue)
    )
    child.start()
    kind, message = queue.get(timeout=120)
    child.join(timeout=60)
    assert kind == "StoreIOError" and "File too large" in message, (kind, message)


def test_read_only_directory_raises(tmp_path):
    if os.geteuid() != 0:
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o555)
        with pytest.raises(StoreIOError, match="Permission denied"):
            LogStore.create(str(readonly / "s"), StoreSchema(layers={"g": (4,)}))
        return
    # root ignores permissions: drop to nobody in a child, in dirs that nobody can reach
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        for name, mode in (("ro", 0o555), ("rw", 0o777)):
            (base / name).mkdir()
            (base / name).chmod(mode)  # not mkdir(mode=...): the umask would mask it
        ctx = store_writer.forkserver()
        outcomes = {}
        for name in ("ro", "rw"):
            queue = ctx.Queue()
            child = ctx.Process(
                target=store_writer.create_as_nobody, args=(str(base / name / "s"), queue)
            )
            child.start()
            outcomes[name] = queue.get(timeout=120)
            child.join(timeout=60)
        assert outcomes["rw"] == ("ok", "")  # the same child succeeds where it may write
        kind, message = outcomes["ro"]
        assert kind == "StoreIOError" and "Permission denied" in message, outcomes["ro"]
    finally:
        shutil.rmtree(base)


def test_same_writer_id_race_is_refused_never_mixed(tmp_path):
    """Two processes log different ids as writer 0 at once, 20 times: each one either finishes
    or is refused before writing, and the store holds exactly the finished ones' rows."""
    ctx = store_writer.forkserver()
    refused = 0
    for trial in range(20):
        url, queue, start = str(tmp_path / f"race{trial}"), ctx.Queue(), ctx.Barrier(2)
        parts = [list(range(0, 120)), list(range(1000, 1120))]
        children = [
            ctx.Process(target=store_writer.race_writer, args=(url, part, start, queue))
            for part in parts
        ]
        for child in children:
            child.start()
        outcomes = [queue.get(timeout=120) for _ in children]
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        assert {kind for kind, _ in outcomes} <= {"ok", "refused"}, outcomes
        finished = [ids for kind, ids in outcomes if kind == "ok"]
        assert finished, outcomes  # the holder is never refused
        for kind, message in outcomes:
            if kind == "refused":
                refused += 1
                assert "writer 0 of" in message and "own writer id" in message
        ids = check_store(url, set(parts[0] + parts[1]))
        assert sorted(ids) == sorted(i for part in finished for i in part)
    assert refused >= 10, f"the processes overlapped in only {refused} of 20 trials"


def test_killed_holder_releases_the_writer_id(tmp_path):
    ctx = store_writer.forkserver()
    url, ids, ready = str(tmp_path / "held"), list(range(40)), ctx.Event()
    child = ctx.Process(target=store_writer.hold_writer, args=(url, ids, ready))
    child.start()
    assert ready.wait(120)
    marker = (Path(url) / "commits" / "0.json").read_bytes()
    with pytest.raises(
        WriterConflictError, match=r"writer 0 of .* in use by another process .*holder [^/]+/\d+\)"
    ):
        LogStore.open(url, "a", writer=0)  # a live holder keeps it
    assert (Path(url) / "commits" / "0.json").read_bytes() == marker  # nothing written
    child.kill()
    child.join()
    expected = ids + [i + 10_000 for i in ids]
    committed = check_store(url, set(expected))
    assert committed == expected[: len(committed)] and len(committed) >= len(ids)
    store_writer.write_ids(url, expected, 0, 7, 0, 0.0)  # reopens writer 0 and resumes
    assert check_store(url, set(expected)) == expected
    assert not list(Path(url).rglob("*.__lock"))


def test_racing_creates_with_different_schemas(tmp_path):
    ctx = store_writer.forkserver()
    schemas = [{"a": (4,)}, {"a": (5,)}]
    for trial in range(6):
        url, queue, start = str(tmp_path / f"create{trial}"), ctx.Queue(), ctx.Barrier(2)
        children = [
            ctx.Process(target=store_writer.race_create, args=(url, layers, start, queue))
            for layers in schemas
        ]
        for child in children:
            child.start()
        outcomes = sorted((queue.get(timeout=120) for _ in children), key=lambda o: o[0])
        for child in children:
            child.join(timeout=60)
        assert [kind for kind, _ in outcomes] == ["SchemaError", "ok"], outcomes
        winner = {k: tuple(v) for k, v in outcomes[1][1].items()}
        assert "store has" in outcomes[0][1]
        store = LogStore.open(url)
        assert dict(store.schema.layers) == winner and len(store) == 5
        assert torch.equal(store.read(store.ids())["a"], torch.ones(5, *winner["a"]))
