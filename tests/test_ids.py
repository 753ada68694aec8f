"""Data ids: content hashes stable across processes, distinct for distinct rows; duplicates."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import logix_func as lf

ROOT = Path(__file__).resolve().parents[1]


def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:300], dtype=torch.float32), torch.tensor(y[:300])


def test_content_ids_same_in_a_subprocess_with_another_hash_seed():
    code = (
        "import sys, torch; sys.path.insert(0, '.'); import logix_func as lf; "
        "from tests.test_ids import digits_batch; "
        "print(','.join(map(str, lf.content_ids(*digits_batch()).tolist())))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    there = [int(v) for v in out.stdout.strip().split(",")]
    assert there == lf.content_ids(*digits_batch()).tolist()


def test_content_ids_follow_the_documented_blake2b_format():
    """Rebuilt with hashlib over numpy bytes: path, dtype, row shape, row bytes per leaf."""
    x = torch.randn(4, 2, 3)
    y = torch.arange(4)
    ids = lf.content_ids(x, {"labels": y})
    for i in range(4):
        h = hashlib.blake2b(digest_size=8, person=b"lf.content.v1")
        h.update(b".0\0torch.float32\0(2, 3)\0" + x.numpy()[i].astype("<f4").tobytes())
        h.update(b".1.labels\0torch.int64\0()\0" + y.numpy()[i].astype("<i8").tobytes())
        assert ids[i] == int.from_bytes(h.digest(), "little") >> 1


def test_content_ids_depend_only_on_the_row():
    x, y = digits_batch()
    ids = lf.content_ids(x, y)
    assert ids.dtype == torch.int64 and ids.shape == (300,) and (ids >= 0).all()
    assert torch.equal(lf.content_ids(x[100:130], y[100:130]), ids[100:130])  # any batch split
    perm = torch.randperm(300)
    assert torch.equal(lf.content_ids(x[perm], y[perm]), ids[perm])
    xt = x.T.contiguous().T  # same values, non-contiguous layout
    assert not xt.is_contiguous() and torch.equal(lf.content_ids(xt, y), ids)


def test_different_content_gives_different_ids():
    x = torch.randn(2000, 8)
    ids = lf.content_ids(x)
    assert len(set(ids.tolist())) == 2000
    nudged = x.clone()
    nudged[7, 3] = torch.nextafter(nudged[7, 3], torch.tensor(np.inf))
    changed = lf.content_ids(nudged) != ids
    assert changed.tolist() == [i == 7 for i in range(2000)]
    for other in (x.double(), x.reshape(2000, 2, 4), (x, x), {"x": x}):
        variant = lf.content_ids(*other) if isinstance(other, tuple) else lf.content_ids(other)
        assert not set(variant.tolist()) & set(ids.tolist())


def test_content_ids_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same leading"):
        lf.content_ids(torch.zeros(3, 2), torch.zeros(4))


def test_string_ids_stable_and_distinct():
    names = [f"doc-{i}" for i in range(1000)]
    ids = lf.string_ids(names)
    h = hashlib.blake2b(b"doc-5", digest_size=8, person=b"lf.string.v1")
    assert ids[5] == int.from_bytes(h.digest(), "little") >> 1
    assert len(set(ids.tolist())) == 1000 and (ids >= 0).all()
    with pytest.raises(TypeError):
        lf.string_ids("doc-1")


def test_index_ids_and_indexed_dataset_through_a_shuffled_loader():
    assert lf.index_ids(10, 3).tolist() == [10, 11, 12]
    data = torch.arange(20.0).reshape(10, 2)
    loader = DataLoader(lf.IndexedDataset(TensorDataset(data)), batch_size=4, shuffle=True)
    seen = []
    for ids, (rows,) in loader:
        assert ids.dtype == torch.int64 and torch.equal(rows, data[ids])
        seen += ids.tolist()
    assert sorted(seen) == list(range(10))


def test_duplicates_within_a_batch_are_named():
    with pytest.raises(lf.DuplicateIdError, match=r"repeat within the batch: \[3, 9\]") as err:
        lf.check_unique(torch.tensor([3, 1, 9, 3, 9, 4]))
    assert err.value.ids == [3, 9]
    with pytest.raises(lf.DuplicateIdError, match=r"\['b'\]"):
        lf.check_unique(["a", "b", "c", "b"])


@pytest.mark.parametrize(
    "seen",
    [{5, 6, 7}, torch.tensor([7, 5, 6]), torch.tensor([0, 5, 6, 7, 9])],
    ids=["set", "tensor", "sorted-tensor"],
)
def test_ids_seen_before_are_named(seen):
    lf.check_unique(torch.tensor([1, 2, 3]), seen)  # fresh ids pass
    with pytest.raises(lf.DuplicateIdError, match=r"seen before: \[6, 5\]"):
        lf.check_unique(torch.tensor([6, 2, 5]), seen)


def test_check_unique_rejects_float_ids_and_lists_long_duplicates_briefly():
    with pytest.raises(TypeError, match="integer"):
        lf.check_unique(torch.tensor([1.0, 2.0]))
    with pytest.raises(lf.DuplicateIdError, match=r"and 15 more"):
        lf.check_unique(torch.arange(25).repeat(2))
