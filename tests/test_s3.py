"""Stores on a real S3 API: moto's standalone server on 127.0.0.1, through tensorstore's s3
kvstore (a spec dict with the server's ``endpoint``; URLs cannot carry one).

Logs a store from a writer process that is killed with SIGKILL in the middle, checks that its
lease keeps the writer id until it expires, resumes, and scores over ``s3://``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from store_writer import LAYERS, rows_for, write_ids
from test_store_processes import check_store

import logix_func as lf
from logix_func.curvature import load_state, save_state
from logix_func.store import LogStore, NotAStoreError, WriterConflictError
from logix_func.store.kvstore import join, read_bytes

BUCKET = "logix-func-tests"
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A kvstore spec factory ``s3(path)`` for a bucket of a fresh moto S3 server."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.skip(f"moto's server cannot start: {e} (pip install 'moto[server]')")
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",  # dummy credentials: moto accepts any
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(empty),  # never read the real ~/.aws files
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    except Exception as e:
        pytest.skip(f"moto's server cannot start: {type(e).__name__}: {e}")
    spec = {"driver": "s3", "bucket": BUCKET, "endpoint": endpoint, "aws_region": "us-east-1"}
    yield lambda path: {**spec, "path": path}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


KILLED_WRITER = """
import json, sys
sys.path.insert(0, {tests!r})
from logix_func.store import lock
import store_writer
lock.LEASE_SECONDS = 3.0
store_writer.write_ids(json.loads(sys.argv[1]), list(range({n})), 0, 8, 1, 0.02)
"""


def test_killed_writer_resumes_on_s3(s3):
    spec, ids = s3("killed/"), list(range(400))
    code = KILLED_WRITER.format(tests=str(TESTS), n=len(ids))
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=os.environ)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            try:
                if len(LogStore.open(spec)) >= 48:
                    break
            except NotAStoreError:
                pass
            time.sleep(0.05)
        assert child.poll() is None, "the writer finished (or failed) before it could be killed"
    finally:
        child.kill()  # SIGKILL: no flush, no release of the lease
        child.wait()
    committed = check_store(spec, set(ids))
    assert 48 <= len(committed) < len(ids) and committed == ids[: len(committed)]
    with pytest.raises(WriterConflictError, match="writer 0 of .* in use by another process"):
        LogStore.open(spec, "a", writer=0)  # the dead holder's lease has not expired yet
    marker = json.loads(read_bytes(join(spec, "commits/0.json")))
    time.sleep(max(0.0, marker["expires"] - time.time()) + 0.2)
    write_ids(spec, ids, 0, 16, 0, 0.0)  # takes the expired lease over and resumes
    assert check_store(spec, set(ids)) == ids


def test_scores_and_factors_over_s3(s3):
    ids = list(range(0, 300, 3))
    with LogStore.create(s3("scored/"), lf.StoreSchema(layers=LAYERS, chunk_rows=32)) as store:
        for start in range(0, len(ids), 40):
            part = ids[start : start + 40]
            store.append(part, rows_for(part, torch.float32))
    store = LogStore.open(s3("scored/"))
    gen = torch.Generator().manual_seed(0)
    query = {name: torch.randn(3, *shape, generator=gen) for name, shape in LAYERS.items()}
    train = rows_for(ids, torch.float32)
    expected = sum(query[k].flatten(1) @ train[k].flatten(1).T for k in LAYERS)

    scores = lf.influence(query, store)
    torch.testing.assert_close(scores, expected)
    written = lf.influence(query, store, out=s3("scores/"))
    torch.testing.assert_close(torch.from_numpy(written.read().result()), expected)
    best = lf.top_k(scores, 5, ids=store.ids())
    assert best.ids.tolist() == [[ids[j] for j in row] for row in expected.topk(5).indices]

    factors = {"spec": torch.tensor(7), "layers": {"fc2": {"eigenvalues": torch.arange(3.0)}}}
    save_state(factors, join(s3("run/"), "factors.pt"))
    loaded = load_state(join(s3("run/"), "factors.pt"))
    assert torch.equal(loaded["layers"]["fc2"]["eigenvalues"], torch.arange(3.0))


def test_check_then_write_leases_are_announced(s3):
    spec = {**s3("unconditional/"), "use_conditional_write": False}
    with (
        pytest.warns(UserWarning, match="use_conditional_write is off.*two processes"),
        LogStore.create(spec, lf.StoreSchema(layers={"g": (2,)})) as store,
    ):
        store.append([1, 2], {"g": torch.ones(2, 2)})
    assert LogStore.open(spec).ids().tolist() == [1, 2]


def test_of_two_racing_openers_of_a_writer_id_one_wins(s3):
    """With tensorstore's check-then-write (use_conditional_write off) both openers took the
    lease in about a third of such races, caught only when both created the shard's arrays."""
    schema = lf.StoreSchema(layers={"g": (2,)})
    for trial in range(10):
        spec, start, outcomes = s3(f"race{trial}/"), threading.Barrier(2), []

        def open_writer(spec=spec, start=start, outcomes=outcomes):
            start.wait()
            try:
                outcomes.append(LogStore.create(spec, schema, writer=0, exist_ok=True))
            except Exception as e:  # the loser must get WriterConflictError, nothing else
                outcomes.append(e)

        threads = [threading.Thread(target=open_writer) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        kinds = sorted(type(o).__name__ for o in outcomes)
        assert kinds == ["LogStore", "WriterConflictError"], outcomes
        next(o for o in outcomes if isinstance(o, LogStore)).close()
