"""Influence, self-influence and top-k against explicit dense computations."""

import pytest
import torch

import logix_func as lf


def rows(n, shapes=None, dtype=torch.float32):
    shapes = shapes or {"a": (3, 4), "b": (2, 5)}
    return {k: torch.randn(n, *s, dtype=dtype) for k, s in shapes.items()}


def dense_operator(shapes):
    """A random SPD matrix per layer and the preconditioner that applies its inverse."""
    mats = {}
    for k, s in shapes.items():
        d = s[0] * s[1]
        m = torch.randn(d, d, dtype=torch.float64)
        mats[k] = m @ m.T + d * torch.eye(d, dtype=torch.float64)
    inv = {k: torch.linalg.inv(m) for k, m in mats.items()}

    def pre(grads):
        return {
            k: (g.reshape(g.shape[0], -1).double() @ inv[k].T).reshape(g.shape).to(g.dtype)
            for k, g in grads.items()
        }

    return pre, inv


def kernel(q, t, inv):
    """k(q, t) = Σ_layers vec(q)ᵀ M⁻¹ vec(t), explicitly: [Q, N]."""
    out = 0
    for k in q:
        qf, tf = q[k].reshape(len(q[k]), -1).double(), t[k].reshape(len(t[k]), -1).double()
        out = out + qf @ inv[k] @ tf.T
    return out


def test_all_modes_equal_explicit_dense_algebra():
    shapes = {"a": (3, 4), "b": (2, 5)}
    q, t = rows(4, shapes), rows(37, shapes)
    pre, inv = dense_operator(shapes)
    kqt, kqq, ktt = kernel(q, t, inv), kernel(q, q, inv).diag(), kernel(t, t, inv).diag()
    expected = {
        "dot": kqt,
        "cosine": kqt / (kqq[:, None] * ktt[None]).sqrt(),
        "l2": -(kqq[:, None] - 2 * kqt + ktt[None]),
        "relative": kqt / ktt.sqrt()[None],
    }
    for mode, want in expected.items():
        for chunk_rows in (1, 5, 37, 1000):
            got = lf.influence(q, t, preconditioner=pre, mode=mode, chunk_rows=chunk_rows)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    selfs = lf.self_influence(t, preconditioner=pre, chunk_rows=6)
    torch.testing.assert_close(selfs.double(), ktt, rtol=1e-4, atol=1e-4)


def test_identity_scores_are_gradient_dot_products_and_layers_sum_to_total():
    q, t = rows(3), rows(20)
    flat = lambda r: torch.cat([v.reshape(len(v), -1) for v in r.values()], 1)  # noqa: E731
    torch.testing.assert_close(lf.influence(q, t), flat(q) @ flat(t).T)
    per_layer = lf.influence(q, t, per_layer=True, chunk_rows=7)
    assert set(per_layer) == {"a", "b"}
    torch.testing.assert_close(sum(per_layer.values()), flat(q) @ flat(t).T)
    for k in q:
        torch.testing.assert_close(per_layer[k], q[k].flatten(1) @ t[k].flatten(1).T)


def test_low_precision_rows_accumulate_in_float32():
    q, t = rows(2), rows(50)
    half = {k: v.to(torch.bfloat16) for k, v in t.items()}
    got = lf.influence(q, half, chunk_rows=8)
    assert got.dtype == torch.float32
    want = lf.influence(q, {k: v.float() for k, v in half.items()})
    torch.testing.assert_close(got, want)


def test_top_k_streams_to_the_same_answer_as_a_full_sort():
    scores = torch.randn(5, 103)
    ids = torch.arange(1000, 1103)
    for largest in (True, False):
        full = scores.topk(7, dim=1, largest=largest)
        streamed = lf.top_k(
            ((ids[i : i + 10], scores[:, i : i + 10]) for i in range(0, 103, 10)),
            7,
            largest=largest,
        )
        torch.testing.assert_close(streamed.values, full.values)
        assert torch.equal(streamed.ids, ids[full.indices])
        direct = lf.top_k(scores, 7, largest=largest)
        assert torch.equal(direct.ids, full.indices)
    strings = [f"doc-{i}" for i in range(103)]
    named = lf.top_k(((strings[i : i + 9], scores[:, i : i + 9]) for i in range(0, 103, 9)), 3)
    assert named.ids[0] == [strings[j] for j in scores[0].topk(3).indices.tolist()]
    with pytest.raises(ValueError, match="larger than the number of training rows"):
        lf.top_k(scores, 200)


def test_influence_chunks_feed_top_k_without_the_full_matrix():
    q, t = rows(3), rows(40)
    stream = lf.influence_chunks(q, t, chunk_rows=6)
    best = lf.top_k(stream, 4)
    full = lf.influence(q, t).topk(4, dim=1)
    torch.testing.assert_close(best.values, full.values)
    assert torch.equal(best.ids, full.indices)


def test_bad_input_is_named():
    q, t = rows(2), rows(10)
    with pytest.raises(ValueError, match="do not match the training rows' layers"):
        lf.influence({"a": q["a"]}, t)
    with pytest.raises(ValueError, match=r"layer 'b'.*another projection"):
        lf.influence({**q, "b": torch.randn(2, 3, 5)}, t)
    bad = {k: v.clone() for k, v in t.items()}
    bad["b"][7, 1, 2] = float("nan")
    with pytest.raises(
        ValueError, match=r"non-finite training rows in layer 'b' for data ids \[7\]"
    ):
        lf.influence(q, bad, chunk_rows=4)
    with pytest.raises(ValueError, match=r"non-finite.*\[7\]"):
        lf.self_influence(bad)
    bad_query = {k: v.clone() for k, v in q.items()}
    bad_query["a"][1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite query rows in layer 'a' for data ids \[1\]"):
        lf.influence(bad_query, t)
    empty = {k: v[:0] for k, v in t.items()}
    with pytest.raises(ValueError, match="empty"):
        lf.influence(q, empty)
    with pytest.raises(ValueError, match="mode must be"):
        lf.influence(q, t, mode="euclid")


def test_scores_too_large_for_memory_go_to_a_tensorstore_array(tmp_path):
    shapes = {"a": (3, 4), "b": (2, 5)}
    q, t = rows(4, shapes), rows(53, shapes)
    pre, inv = dense_operator(shapes)
    for url in (str(tmp_path / "scores"), "memory://scores"):
        array = lf.influence(q, t, preconditioner=pre, chunk_rows=10, out=url)
        assert tuple(array.shape) == (4, 53)
        got = torch.from_numpy(array.read().result()).double()
        torch.testing.assert_close(got, kernel(q, t, inv), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="per_layer"):
        lf.influence(q, t, per_layer=True, out=str(tmp_path / "layers"))


def test_store_scores_equal_the_dense_kernel_whatever_chunk_rows(tmp_path):
    """Reads are whole stored chunks, cut into ranges of ``chunk_rows``: same ranges, ids and
    scores for sizes below, between and above the stored chunk (two writers' shards)."""
    shapes = {"a": (3, 4), "b": (2, 5)}
    q, t = rows(3, shapes), rows(45, shapes)
    pre, inv = dense_operator(shapes)
    url = str(tmp_path / "store")
    schema = lf.StoreSchema(layers=shapes, chunk_rows=8)
    for writer, part in ((0, slice(0, 19)), (1, slice(19, 45))):
        with lf.LogStore.create(url, schema, writer=writer, exist_ok=True) as store:
            store.append(range(part.start, part.stop), {k: v[part] for k, v in t.items()})
    store = lf.LogStore.open(url)
    for chunk_rows in (1, 3, 8, 13, 20, 64):
        got = lf.influence(q, store, preconditioner=pre, chunk_rows=chunk_rows)
        torch.testing.assert_close(got.double(), kernel(q, t, inv), rtol=1e-4, atol=1e-4)
        selfs = lf.self_influence(store, preconditioner=pre, chunk_rows=chunk_rows)
        torch.testing.assert_close(selfs.double(), kernel(t, t, inv).diag(), rtol=1e-4, atol=1e-4)
        for begin, end in ((0, 45), (5, 30)):
            chunks = list(store.iter_chunks(chunk_rows=chunk_rows, start=begin, stop=end))
            # ranges of chunk_rows from each shard's first row in [begin, end), never across
            sizes = [
                min(chunk_rows, hi - a)
                for lo, hi in ((begin, min(end, 19)), (max(begin, 19), end))
                for a in range(lo, hi, chunk_rows)
            ]
            assert [len(ids) for ids, _ in chunks] == sizes
            assert torch.cat([ids for ids, _ in chunks]).tolist() == list(range(begin, end))
            torch.testing.assert_close(torch.cat([c["b"] for _, c in chunks]), t["b"][begin:end])
