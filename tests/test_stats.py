"""Running statistics against numpy (float64) on the concatenated data."""

import numpy as np
import pytest
import torch

import logix_func as lf

STATS = {
    "mean": lambda ddof: lf.running_mean(),
    "variance": lf.running_variance,
    "covariance": lf.running_covariance,
}


def reference(kind: str, rows: np.ndarray, ddof: int = 0) -> np.ndarray:
    """numpy float64 statistic of ``rows [R, *shape]`` (covariance of the flattened rows)."""
    shape = rows.shape[1:]
    rows = rows.astype(np.float64).reshape(len(rows), -1)
    if kind == "mean":
        return rows.mean(0).reshape(shape)
    cov = np.atleast_2d(np.cov(rows.T, ddof=ddof))
    return cov if kind == "covariance" else np.diag(cov).reshape(shape)


def accumulate(stat, x: torch.Tensor, sizes, mask=None, shape=None, **init):
    state = stat.init(tuple(x.shape[1:]) if shape is None else shape, **init)
    start = 0
    for size in sizes:
        chunk_mask = None if mask is None else mask[start : start + size]
        state = stat.update(state, x[start : start + size], chunk_mask)
        start += size
    assert start == len(x)
    return state


def random_chunking(rng: np.random.Generator, n: int) -> list[int]:
    cuts = np.sort(rng.integers(0, n + 1, size=rng.integers(1, 8)))
    return np.diff(np.concatenate([[0], cuts, [n]])).tolist()  # may hold 0- and 1-row chunks


@pytest.mark.parametrize("kind", STATS)
@pytest.mark.parametrize("ddof", [0, 1])
def test_any_chunking_matches_numpy(kind, ddof):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(203, 3, 2)) * [[1.0, 3.0]] + 5.0
    x = torch.from_numpy(data)
    stat = STATS[kind](ddof)
    want = reference(kind, data, ddof)
    for _ in range(5):
        got = stat.finalize(accumulate(stat, x, random_chunking(rng, len(x))))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", STATS)
def test_merge_of_separate_states_matches_numpy(kind):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(97, 4)) - 3.0, rng.normal(size=(61, 4)) * 2 + 7.0  # shifted shards
    stat = STATS[kind](0)
    sa = accumulate(stat, torch.from_numpy(a), random_chunking(rng, len(a)))
    sb = accumulate(stat, torch.from_numpy(b), random_chunking(rng, len(b)))
    want = reference(kind, np.concatenate([a, b]))
    np.testing.assert_allclose(stat.finalize(stat.merge(sa, sb)).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(stat.finalize(stat.merge(sb, sa)).numpy(), want, rtol=1e-12)
    empty = stat.init((4,))
    for merged in (stat.merge(sa, empty), stat.merge(empty, sa)):
        np.testing.assert_allclose(
            stat.finalize(merged).numpy(), reference(kind, a), rtol=1e-12, atol=1e-15
        )


def test_sums_over_shards_equal_the_union():
    """``to_sums`` about one shift are sum-able: what an all-reduce does across processes."""
    rng = np.random.default_rng(3)
    shards = [rng.normal(size=(n, 5)) + 100.0 for n in (40, 1, 77)]
    stat = lf.running_covariance()
    states = [accumulate(stat, torch.from_numpy(s), [len(s)]) for s in shards]
    shift = states[0]["mean"]
    sums = [stat.to_sums(s, shift) for s in states]
    total = {k: sum(s[k] for s in sums) for k in sums[0]}
    merged = stat.from_sums(total, shift)
    want = reference("covariance", np.concatenate(shards))
    np.testing.assert_allclose(stat.finalize(merged).numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("kind", ["variance", "covariance"])
def test_stable_with_a_large_mean_in_float32(kind):
    """Data = 1e6 + N(0, 1) in float32: the one-pass sum-of-squares formula in float32 is off by
    orders of magnitude, the running statistic matches numpy float64 on the same float32 values
    to float32 precision (1e-6 of the largest entry)."""
    x = (1e6 + torch.randn(20_000, 6)).float()
    want = reference(kind, x.numpy())
    stat = STATS[kind](0)
    got = stat.finalize(accumulate(stat, x, [1000] * 20)).numpy()
    mean = x.mean(0)
    if kind == "variance":
        naive = (x * x).mean(0) - mean * mean
    else:
        naive = x.T @ x / len(x) - torch.outer(mean, mean)
    scale = np.abs(want).max()
    assert np.abs(naive.numpy() - want).max() / scale > 1.0
    assert np.abs(got - want).max() / scale < 1e-6


@pytest.mark.parametrize("kind", STATS)
def test_token_mask_excludes_rows_even_nan(kind):
    """x [N, T, H] with a mask [N, T]: rows are tokens; masked tokens hold NaN and are ignored."""
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    mask = torch.rand(7, 5) > 0.4
    x[~mask] = float("nan")
    stat = STATS[kind](0)
    state = accumulate(stat, x, [3, 0, 4], mask=mask, shape=(3,))
    want = reference(kind, x[mask].numpy())
    np.testing.assert_allclose(stat.finalize(state).numpy(), want, rtol=1e-12)
    assert float(state["n"]) == mask.sum()


def test_sample_mask_and_float_weights():
    """A mask [N] on x [N, T, H] drops whole samples; float weights are frequency weights."""
    stat = lf.running_covariance(ddof=1)
    x = torch.randn(6, 4, 2, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True])
    state = stat.update(stat.init((2,)), x, keep)
    np.testing.assert_allclose(
        stat.finalize(state).numpy(), reference("covariance", x[keep].reshape(-1, 2).numpy(), 1)
    )
    counts = torch.tensor([0, 1, 3, 2, 0, 5])
    rows = x.reshape(-1, 2)
    state = accumulate(stat, x, [2, 4], mask=counts.double(), shape=(2,))
    repeated = rows.repeat_interleave(counts.repeat_interleave(4), dim=0).numpy()
    np.testing.assert_allclose(stat.finalize(state).numpy(), reference("covariance", repeated, 1))


def test_dict_logs_update_leafwise():
    logs = {"fc1": torch.randn(9, 4), "fc2": torch.randn(9, 2, 3)}
    stat = lf.running_variance()
    state = stat.init(logs)
    state = stat.update(state, logs, mask=torch.arange(9) % 3 != 0)
    state = stat.update(state, {k: v + 1 for k, v in logs.items()})
    got = stat.finalize(state)
    keep = torch.arange(9) % 3 != 0
    for name, v in logs.items():
        rows = torch.cat([v[keep], v + 1]).numpy()
        np.testing.assert_allclose(got[name].numpy(), reference("variance", rows), rtol=1e-6)
    with pytest.raises(KeyError, match=r"missing \['fc2'\]"):
        stat.update(state, {"fc1": logs["fc1"]})


def test_state_keeps_its_device_and_dtype_and_is_not_mutated():
    stat = lf.running_covariance()
    state = stat.init((3,), device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in state.items()}
    x = torch.randint(-5, 5, (10, 3))  # integer inputs are converted
    new = stat.update(state, x)
    for k in before:
        assert torch.equal(state[k], before[k])
        assert new[k].dtype == torch.float32 and new[k].device.type == "cpu"
    np.testing.assert_allclose(
        stat.finalize(new).numpy(), reference("covariance", x.numpy()), rtol=1e-5
    )
    assert stat.init(torch.zeros(4, 2, dtype=torch.bfloat16))["m2"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_cpu_state():
    stat = lf.running_variance()
    x = 1e6 + torch.randn(500, 8, device="cuda")
    state = accumulate(stat, x, [100] * 5, device="cpu")
    assert state["m2"].device.type == "cpu"
    np.testing.assert_allclose(
        stat.finalize(state).numpy(), reference("variance", x.cpu().numpy()), rtol=1e-6
    )


def test_update_compiles_fullgraph():
    """Dict logs with a token mask, two batch sizes (the second compiles a dynamic batch)."""
    stat = lf.running_covariance()
    batches = [
        ({"a": torch.randn(n, 5, 3), "b": torch.randn(n, 5, 2) + 1e3}, torch.rand(n, 5) > 0.3)
        for n in (8, 8, 3)
    ]
    state = stat.init({"a": (3,), "b": (2,)})
    compiled = torch.compile(stat.update, fullgraph=True)
    got, want = state, state
    for logs, mask in batches:
        got, want = compiled(got, logs, mask), stat.update(want, logs, mask)
    for k in ("a", "b"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
        rows = torch.cat([logs[k][mask] for logs, mask in batches]).numpy()
        np.testing.assert_allclose(
            stat.finalize(got)[k].numpy(), reference("covariance", rows), rtol=1e-6
        )


def test_bad_inputs_are_named():
    stat = lf.running_variance()
    state = stat.init((3,))
    with pytest.raises(ValueError, match=r"rows of shape \(3,\).*\(4, 2\)"):
        stat.update(state, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"mask of shape \(5,\)"):
        stat.update(state, torch.zeros(4, 3), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="no rows"):
        lf.running_mean().finalize(lf.running_mean().init((3,)))
    with pytest.raises(ValueError, match="ddof=1"):
        lf.running_variance(ddof=1).finalize(stat.update(state, torch.zeros(1, 3)))
