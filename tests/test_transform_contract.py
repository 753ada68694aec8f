"""One contract for every transform: the same init(spec)/update(state, logs)/finalize calls fit
KFAC, EKFAC, raw, the GGN and the running statistics, each checked against a for-loop of
``torch.autograd.grad`` over an explicitly written MLP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix_func as lf
from logix_func.curvature import CurvatureLogs, LayerInverse
from logix_func.curvature._precondition import (
    CholeskyInverse,
    EigenInverse,
    KroneckerEigenInverse,
    layer_inverse,
)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    return model, dict(model.named_parameters()), x, y, lf.logra(model, rank=None)


def reference(model, x, label):
    """Per sample n and layer: input ``a = [x, 1]``, output gradient ``δ`` of
    ``CE(logits_n, label(n))`` and ``G = δ aᵀ``, one ``torch.autograd.grad`` per sample."""
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    out = {"0": [], "2": []}
    for n in range(len(x)):
        z1 = (x[n] @ w1.T + b1).requires_grad_()
        h = torch.tanh(z1)
        z2 = (h @ w2.T + b2).detach().requires_grad_()
        loss = F.cross_entropy(z2, label(n, z2))
        (d2,) = torch.autograd.grad(loss, z2)
        (d1,) = torch.autograd.grad(h @ w2.T + b2, z1, d2)
        for name, a, d in (("0", x[n], d1), ("2", h.detach(), d2)):
            a = torch.cat([a, torch.ones(1)])
            out[name].append((a, d, torch.outer(d, a)))
    return out


def empirical(model, x, y):
    return reference(model, x, lambda n, z: y[n])


def run(transform, spec, logs):
    """The one way every transform is driven."""
    state = transform.init(spec)
    for batch in logs:
        state = transform.update(state, batch)
    return transform.finalize(state)


def curvature_logs(model, params, x, y, spec, fisher):
    chunks = zip(x.split(10), y.split(10), strict=True)
    return [
        CurvatureLogs(*lf.fisher_logs(model, params, batch, spec, fisher=fisher))
        for batch in chunks
    ]


def kron_reference(samples):
    """KFAC's ``A = E[a aᵀ]``, ``S = E[δ δᵀ]`` and EKFAC's dense matrix in their eigenbasis."""
    a_cov = sum(torch.outer(a, a) for a, _, _ in samples) / len(samples)
    s_cov = sum(torch.outer(d, d) for _, d, _ in samples) / len(samples)
    qa, qs = torch.linalg.eigh(a_cov)[1], torch.linalg.eigh(s_cov)[1]
    lam = sum((qs.T @ g @ qa) ** 2 for _, _, g in samples) / len(samples)
    q = torch.kron(qs, qa)
    return a_cov, s_cov, q @ torch.diag(lam.reshape(-1)) @ q.T


def test_kfac_ekfac_raw_and_stats_follow_one_signature(problem):
    model, params, x, y, spec = problem
    logs = curvature_logs(model, params, x, y, spec, "empirical")
    ref = empirical(model, x, y)
    kfac = run(lf.kfac("empirical", dtype=torch.float64), spec, logs)
    ekfac = run(lf.ekfac(kfac), spec, logs)
    raw = run(lf.curvature.raw(dtype=torch.float64), spec, logs)
    cov = run(lf.running_covariance(), spec, logs)
    mean = run(lf.running_mean(), spec, logs)
    for name, samples in ref.items():
        a_cov, s_cov, ek_dense = kron_reference(samples)
        flat = torch.stack([g.reshape(-1) for _, _, g in samples])
        torch.testing.assert_close(kfac["layers"][name]["A"], a_cov)
        torch.testing.assert_close(kfac["layers"][name]["S"], s_cov)
        f = ekfac["layers"][name]
        q = torch.kron(f["QS"], f["QA"])
        torch.testing.assert_close(q @ torch.diag(f["eigenvalues"].reshape(-1)) @ q.T, ek_dense)
        torch.testing.assert_close(raw["layers"][name]["C"], flat.T @ flat / len(flat))
        torch.testing.assert_close(cov[name], torch.cov(flat.T, correction=0))
        torch.testing.assert_close(mean[name], flat.mean(0).reshape(samples[0][2].shape))


def test_ggn_path_is_the_exact_fisher_of_a_for_loop(problem):
    """``raw(eigh=False)`` over exact-Fisher logs: ``(1/N) Σ_n Σ_c p_nc vec(G_nc) vec(G_nc)ᵀ``."""
    model, params, x, y, spec = problem
    logs = curvature_logs(model, params, x, y, spec, "exact")
    ggn = run(lf.curvature.raw(dtype=torch.float64, eigh=False), spec, logs)
    probs = model(x).softmax(-1).detach()
    per_class = [reference(model, x, lambda n, z, c=c: torch.tensor(c)) for c in range(3)]
    for name in ("0", "2"):
        want = sum(
            probs[n, c] * torch.outer(g.reshape(-1), g.reshape(-1))
            for c in range(3)
            for n, (_, _, g) in enumerate(per_class[c][name])
        ) / len(x)
        assert set(ggn["layers"][name]) == {"C"}
        torch.testing.assert_close(ggn["layers"][name]["C"], want)


def test_older_call_forms_give_the_same_states(problem):
    model, params, x, y, spec = problem
    grads, logs = lf.fisher_logs(model, params, (x, y), spec, fisher="exact")
    k, r = lf.kfac("exact"), lf.curvature.raw()
    kf = k.finalize(k.update(k.init(spec), logs))
    e = lf.ekfac(kf)
    pairs = [  # (older form, the contract's)
        (k.update(k.init(spec), logs), k.update(k.init(spec), CurvatureLogs(grads, logs))),
        (e.update(e.init(), grads, logs), e.update(e.init(spec), (grads, logs))),
        (r.update(r.init(spec), grads), r.update(r.init(spec), CurvatureLogs(grads))),
    ]
    for old, new in pairs:
        assert torch.equal(old["spec"], new["spec"])
        for name, layer in old["layers"].items():
            for key, value in layer.items():
                torch.testing.assert_close(value, new["layers"][name][key])
    assert torch.equal(kf["spec"], spec.tag())
    assert spec.dims() == {"0": (5, 5), "2": (3, 6)}
    other = lf.logra(model, rank=2, seed=1)
    with pytest.raises(ValueError, match="spec's tag .* differs from the KFAC factors'"):
        lf.ekfac(kf).init(other)
    with pytest.raises(TypeError, match="inside CurvatureLogs"):
        r.update(r.init(spec), CurvatureLogs(grads, logs), logs)


def test_each_factor_form_has_its_layer_inverse(problem):
    model, params, x, y, spec = problem
    logs = curvature_logs(model, params, x, y, spec, "exact")
    kf = run(lf.kfac("exact", dtype=torch.float64), spec, logs)
    forms = {
        KroneckerEigenInverse: kf,
        EigenInverse: run(lf.curvature.raw(dtype=torch.float64), spec, logs),
        CholeskyInverse: run(lf.curvature.raw(dtype=torch.float64, eigh=False), spec, logs),
    }
    queries = lf.projected_grads(model, params, (x[:3], y[:3]), spec)
    for kind, factors in forms.items():
        pre = lf.preconditioner(factors, damping=0.1)
        assert all(type(inv) is kind for inv in pre.inverses.values())
        for name, g in pre(queries).items():  # against an explicit dense solve
            f = factors["layers"][name]
            if kind is KroneckerEigenInverse:
                q = torch.kron(f["QS"], f["QA"])
                dense = q @ torch.diag(f["eigenvalues"].reshape(-1)) @ q.T
            else:
                dense = f["C"]
            flat = queries[name].reshape(3, -1)
            want = torch.linalg.solve(dense + 0.1 * torch.eye(len(dense)), flat.T).T
            torch.testing.assert_close(g.reshape(3, -1), want)
    assert isinstance(layer_inverse("0", kf["layers"]["0"]), LayerInverse)
    with pytest.raises(ValueError, match=r"layer '0': factors with entries \['A', 'S'\]"):
        layer_inverse("0", {"A": torch.eye(2), "S": torch.eye(2)})
