"""Exact dense curvatures of the digits MLP's objective: LDS of ``g_testᵀ (M + λI)⁻¹ g_train``.

    python -m benchmarks.dense_curvature [--data tests/data/lds_deep_mlp.npz]
        [--dampings 0 1e-4 3e-4 1e-3 3e-3 1e-2] [--members 1] [--curvatures ggn ...]

On the stored full-data model (float64) of ``--data``, with ``M`` one of

- the GGN of the objective ``mean CE + (wd / 2) ‖θ‖²`` (`digits.mlp_objective`), all layers
  together (cross-layer blocks included): ``G = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n + wd I``
  with ``J_n = ∂z_n/∂θ [C, D]`` the per-example Jacobian of the logits;
- the Hessian ``H`` of the same objective (weight decay included);
- the per-layer block-diagonal versions of both (a layer: its weight and bias),

and ``g`` the per-example gradients of the cross-entropy. Every λ of ``--dampings`` is added
to ``M`` as it is; for the Hessian only the λ where ``H + λI`` is positive definite (its
smallest eigenvalue is printed). The LDS (`lf.lds`, ``measurement="loss"``, every test point)
is against the ground truth's seed-mean test losses.

How. ``G − wd I = UᵀU`` with ``U = [B_nᵀ J_n / √N]_n [N·C, D]`` and
``B_n = diag √p_n − p_n √p_nᵀ`` (``B_n B_nᵀ = diag p_n − p_n p_nᵀ`` since ``Σ p = 1``). A block
wider than ``N·C`` is solved in the Gram form (Woodbury, ``μ = wd + λ``):
``gᵀ(UᵀU + μI)⁻¹g' = (gᵀg' − (Ug)ᵀ (UUᵀ + μI)⁻¹ (Ug')) / μ``; a narrower one densely. ``H`` is
built column by column from Hessian-vector products (forward over reverse, chunks of
``--chunk`` basis vectors). Each λ costs one Cholesky factorisation (of ``[N·C]²`` or
``[d]²``), cheaper here than one eigendecomposition of a 26k-wide matrix on a CPU.
``--members K`` (K > 1) then scores the ensemble of the stored full-data models ``0 .. K−1``
(mean of their scores) with the all-layer GGN (``--ensemble-curvature hessian``: the all-layer
Hessian) at the best λ of model 0, one matrix per model; ``--scores-dir`` keeps each member's
scores there and reads them back when present, so a long run resumes where it stopped.
Wall time of each step is printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from scipy.linalg import cho_factor, cho_solve
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vmap

from benchmarks.lds_data import load_ground_truth
from logix_func.demo import digits

DAMPINGS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
CURVATURES = ("ggn", "ggn-layers", "hessian", "hessian-layers", "ggn-tridiagonal")


class Problem:
    """The objective of one full-data model as functions of the flat parameter vector θ [D]."""

    def __init__(self, model, params: dict[str, Tensor], split, weight_decay: float):
        self.model, self.split, self.wd = model, split, weight_decay
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]
        self.theta = torch.cat([params[k].double().flatten() for k in self.names])
        # a layer = its weight and bias: the parameter names sharing a module prefix
        prefixes = [k.rsplit(".", 1)[0] for k in self.names]
        bounds, start = [], 0
        for p in dict.fromkeys(prefixes):
            width = sum(s for s, q in zip(self.sizes, prefixes, strict=True) if q == p)
            bounds.append((start, start + width))
            start += width
        self.layers = bounds

    def unflat(self, theta: Tensor) -> dict[str, Tensor]:
        chunks = theta.split(self.sizes)
        return {k: c.view(s) for k, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def logits(self, theta: Tensor, x: Float[Tensor, " 64"]) -> Float[Tensor, " C"]:
        return functional_call(self.model, self.unflat(theta), (x[None],))[0]

    def grads(self, x: Tensor, y: Tensor) -> Float[Tensor, "n D"]:
        """Per-example gradients of the cross-entropy (no weight decay)."""

        def loss(theta, xi, yi):
            return torch.nn.functional.cross_entropy(self.logits(theta, xi)[None], yi[None])

        return torch.cat(
            [
                vmap(grad(loss), in_dims=(None, 0, 0))(self.theta, xc, yc)
                for xc, yc in zip(x.split(200), y.split(200), strict=True)
            ]
        )

    def ggn_rows(self, chunk: int = 100) -> Float[Tensor, "NC D"]:
        """``U`` with ``UᵀU = (1/N) Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n``."""
        x = self.split.train_x
        rows = []
        for xc in x.split(chunk):
            jac = vmap(jacrev(self.logits), in_dims=(None, 0))(self.theta, xc)  # [c, C, D]
            prob = torch.softmax(vmap(self.logits, in_dims=(None, 0))(self.theta, xc), dim=1)
            root = prob.sqrt()
            b = torch.diag_embed(root) - prob[:, :, None] * root[:, None, :]  # [c, C, C]
            rows.append(torch.einsum("nca,ncd->nad", b, jac).flatten(0, 1))
        return torch.cat(rows) / len(x) ** 0.5

    def hessian(self, chunk: int, out: Tensor | None = None) -> Float[Tensor, "D D"]:
        """The dense Hessian of `digits.mlp_objective`, ``chunk`` columns at a time, written
        into ``out`` (e.g. a tensor over a file-backed memory map) or a new tensor."""
        x, y = self.split.train_x, self.split.train_y

        def objective(theta):
            return digits.mlp_objective(self.model, self.unflat(theta), x, y, self.wd)

        def hvp(v):
            return jvp(grad(objective), (self.theta,), (v,))[1]

        d = len(self.theta)
        out = torch.empty(d, d, dtype=torch.float64) if out is None else out
        for start in range(0, d, chunk):
            stop = min(start + chunk, d)
            basis = torch.zeros(stop - start, d, dtype=torch.float64)
            basis[:, start:stop] = torch.eye(stop - start, dtype=torch.float64)
            out[start:stop] = vmap(hvp)(basis)
        return out  # symmetric up to rounding; the Cholesky factors read one triangle


def dense_scores(
    m: Float[Tensor, "d d"] | np.ndarray,
    g_te: Tensor,
    g_tr: Tensor,
    dampings,
    scratch: str | None = None,
) -> dict[float, Tensor | None]:
    """``{λ: g_te (M + λI)⁻¹ g_trᵀ}`` by Cholesky; ``None`` where ``M + λI`` is not PD.

    One working copy of the symmetric ``M`` (a tensor, an array or a memory map) at a time,
    factored in place; with ``scratch`` (a path) that copy is a file-backed memory map, which
    the system can page out instead of running out of memory (``M`` may be 5 GB)."""
    m = np.asarray(m)
    out = {}
    for lam in dampings:
        if scratch is None:
            work = np.array(m.T, order="F")  # Mᵀ = M: the transposed view is already F-ordered
        else:
            work = np.lib.format.open_memmap(scratch, "w+", m.dtype, m.shape, fortran_order=True)
            work[...] = m.T
        work[np.diag_indices_from(work)] += lam
        try:
            factor = cho_factor(work, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            out[lam] = None
            continue
        solved = cho_solve(factor, g_tr.T.numpy(), check_finite=False)
        out[lam] = g_te @ torch.from_numpy(solved)
        del work, factor
    return out


def cholesky_scores(m: Float[Tensor, "d d"], lam: float, g_te: Tensor, g_tr: Tensor) -> Tensor:
    """``g_te (M + λI)⁻¹ g_trᵀ``, factoring ``M`` in place with torch (SciPy's OpenBLAS
    Cholesky crashed on the 26k-wide Hessian here)."""
    m.diagonal().add_(lam)
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(m, out=(m, info))
    if info.item() != 0:
        raise ValueError(f"M + {lam:g} I is not positive definite")
    return g_te @ torch.cholesky_solve(g_tr.T, m.tril_())


def gram_scores(
    u: Float[Tensor, "r d"], base: float, g_te: Tensor, g_tr: Tensor, dampings
) -> dict[float, Tensor]:
    """``{λ: g_te (UᵀU + (base + λ) I)⁻¹ g_trᵀ}`` through the ``[r, r]`` Gram matrix."""
    gram, p_te, p_tr, dots = u @ u.T, u @ g_te.T, u @ g_tr.T, g_te @ g_tr.T
    out = {}
    for lam in dampings:
        mu = base + lam
        shifted = gram.clone()
        shifted.diagonal().add_(mu)
        factor = torch.linalg.cholesky(shifted)
        out[lam] = (dots - p_te.T @ torch.cholesky_solve(p_tr, factor)) / mu
        del shifted, factor
    return out


def ggn_scores(u, wd, g_te, g_tr, dampings, cols=None) -> dict[float, Tensor]:
    """Scores of the GGN ``UᵀU + wd I`` restricted to the columns ``cols`` (all: None)."""
    if cols is not None:
        u, g_te, g_tr = (
            u[:, cols[0] : cols[1]],
            g_te[:, cols[0] : cols[1]],
            g_tr[:, cols[0] : cols[1]],
        )
    if u.shape[1] > u.shape[0]:
        return gram_scores(u, wd, g_te, g_tr, dampings)
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    return dense_scores(u.T @ u + wd * eye, g_te, g_tr, dampings)


def neighbour_grams(u: Float[Tensor, "r D"], layers) -> dict[tuple[int, int], Tensor]:
    """``{(i, j): U_iᵀ U_j}`` for ``j = i`` and ``j = i − 1``: the GGN's tridiagonal blocks."""
    cols = [slice(a, b) for a, b in layers]
    pairs = [(i, j) for i in range(len(cols)) for j in (i, i - 1) if j >= 0]
    return {(i, j): u[:, cols[i]].T @ u[:, cols[j]] for i, j in pairs}


def tridiagonal_scores(grams, layers, wd, g_te, g_tr, dampings) -> dict[float, Tensor]:
    """Scores of the block-tridiagonal inverse of the GGN (Martens & Grosse 2015, §4.3).

    With ``G = UᵀU + (wd + λ) I`` in layer blocks ``G_ij`` (``grams``: `neighbour_grams`), the
    layers as a Markov chain: ``Ψ_i = G_{i,i+1} G_{i+1,i+1}⁻¹``, ``Σ_i = G_ii − Ψ_i G_{i+1,i}``
    (``Σ_L = G_LL``) and ``Ĝ⁻¹ = Ξᵀ diag(Σ_i⁻¹) Ξ``, ``(Ξg)_i = g_i − Ψ_i g_{i+1}``: exact on the
    tridiagonal blocks of ``G``, cross-layer terms between neighbours kept, the others implied
    by the chain."""
    cols = [slice(a, b) for a, b in layers]
    out = {}
    for lam in dampings:

        def factor(i, minus=None, lam=lam):
            """Cholesky factor of ``G_ii − minus``, in place on one working copy."""
            m = grams[i, i].numpy().copy(order="F")
            m[np.diag_indices_from(m)] += wd + lam
            if minus is not None:
                m -= minus.numpy()
            return cho_factor(m, lower=True, overwrite_a=True, check_finite=False)

        def solve(f, rhs):
            return torch.from_numpy(cho_solve(f, rhs.numpy(), check_finite=False))

        parts = []
        for i in range(len(cols)):
            t_te, t_tr, minus = g_te[:, cols[i]], g_tr[:, cols[i]], None
            if i + 1 < len(cols):
                below = grams[i + 1, i]  # G_{i+1,i}
                psi_t = solve(factor(i + 1), below)  # G_{i+1,i+1}⁻¹ G_{i+1,i}
                minus = below.T @ psi_t  # G_{i,i+1} G_{i+1,i+1}⁻¹ G_{i+1,i}
                t_te = t_te - g_te[:, cols[i + 1]] @ psi_t
                t_tr = t_tr - g_tr[:, cols[i + 1]] @ psi_t
                del psi_t
            parts.append(t_te @ solve(factor(i, minus), t_tr.T.contiguous()))
            del minus
        out[lam] = sum(parts)
    return out


def smallest_eig(m: Tensor | np.ndarray) -> float:
    """The smallest eigenvalue of a symmetric ``m`` (Lanczos, ARPACK)."""
    from scipy.sparse.linalg import eigsh

    if len(m) <= 4096:
        return float(torch.linalg.eigvalsh(torch.as_tensor(m))[0])
    return float(eigsh(np.asarray(m), k=1, which="SA", tol=1e-6, return_eigenvectors=False)[0])


def summed(parts: list[dict[float, Tensor | None]]) -> dict[float, Tensor | None]:
    """Per λ, the sum of the layers' scores (``None`` if any layer's is)."""
    out = {}
    for lam in parts[0]:
        values = [p[lam] for p in parts]
        out[lam] = None if any(v is None for v in values) else sum(values)
    return out


def member_scores(member: Problem, k: int, args, lam: float, known: dict, split) -> Tensor:
    """Member ``k``'s all-layer scores at ``λ``: ``known[λ]`` if given, else read from
    ``--scores-dir`` if saved there, else computed (and saved there)."""
    if lam in known and args.ensemble_curvature == "ggn":
        return known[lam]
    path = None
    if args.scores_dir is not None:
        path = Path(args.scores_dir) / f"member{k}-{args.ensemble_curvature}-{lam:g}.npy"
        if path.exists():
            return torch.from_numpy(np.load(path))
    g_tr = member.grads(split.train_x, split.train_y)
    g_te = member.grads(split.test_x, split.test_y)
    if args.ensemble_curvature == "ggn":
        scores = ggn_scores(member.ggn_rows(), member.wd, g_te, g_tr, [lam])[lam]
    else:
        scores = cholesky_scores(member.hessian(args.chunk), lam, g_te, g_tr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, scores.numpy())
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="tests/data/lds_deep_mlp.npz")
    parser.add_argument("--dampings", type=float, nargs="+", default=list(DAMPINGS))
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256, help="Hessian columns per vmap")
    parser.add_argument("--curvatures", nargs="+", choices=CURVATURES, default=CURVATURES[:4])
    parser.add_argument(
        "--ensemble-damping",
        type=float,
        default=None,
        help="λ of the ensemble's GGN (default: the best of the 'ggn' row, else the first λ)",
    )
    parser.add_argument(
        "--hessian-file",
        default=None,
        help="a .npy the Hessian is saved to once built and read back from when present",
    )
    parser.add_argument(
        "--ensemble-curvature", choices=("ggn", "hessian"), default="ggn", help="members' matrix"
    )
    parser.add_argument("--scores-dir", default=None, help="each member's scores, kept")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gt = load_ground_truth(args.data, members=args.members)
    split = gt.split
    split = type(split)(*(t.double() if t.is_floating_point() else t for t in vars(split).values()))
    print(f"ground truth {args.data}: {gt.describe}", flush=True)
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        print(f"  [{name}: {now - clock:.0f} s]", flush=True)
        clock = now

    def report(label: str, scores: dict[float, Tensor | None]) -> dict[float, float]:
        lds = {lam: gt.lds(s) for lam, s in scores.items() if s is not None}
        cells = [f"{lds[lam]:.3f}" if lam in lds else "  —  " for lam in scores]
        print(f"{label:28s} " + " ".join(f"{c:>7s}" for c in cells), flush=True)
        return lds

    wd = digits.MLP_WEIGHT_DECAY
    problems = [Problem(gt.model, p, split, wd) for p in gt.params]
    prob = problems[0]
    print(f"D = {len(prob.theta)}, layers {[b - a for a, b in prob.layers]}", flush=True)
    g_tr = prob.grads(split.train_x, split.train_y)
    g_te = prob.grads(split.test_x, split.test_y)
    u = prob.ggn_rows()
    step(f"gradients and GGN rows U {list(u.shape)}")
    print(
        f"{'curvature':28s} " + " ".join(f"{'λ=' + format(lam, 'g'):>7s}" for lam in args.dampings)
    )
    report("gradient dot products", {0.0: g_te @ g_tr.T})
    lds_ggn, ggn = {}, {}
    if "ggn" in args.curvatures:
        ggn = ggn_scores(u, wd, g_te, g_tr, args.dampings)
        lds_ggn = report("GGN, all layers", ggn)
        step("GGN, all layers")
    if "ggn-layers" in args.curvatures:
        parts = [ggn_scores(u, wd, g_te, g_tr, args.dampings, cols) for cols in prob.layers]
        report("GGN, per layer", summed(parts))
        step("GGN, per layer")
        del parts
    if "ggn-tridiagonal" in args.curvatures:
        grams = neighbour_grams(u, prob.layers)
        u = None  # the blocks are all the chain needs
        scores = tridiagonal_scores(grams, prob.layers, wd, g_te, g_tr, args.dampings)
        del grams
        report("GGN, block-tridiagonal", scores)
        step("GGN, block-tridiagonal")
    u = None
    if args.members > 1:
        best = args.ensemble_damping
        if best is None:
            best = max(lds_ggn, key=lds_ggn.get) if lds_ggn else args.dampings[0]
        total = None
        for k, member in enumerate(problems):
            scores = member_scores(member, k, args, best, ggn if k == 0 else {}, split)
            total = scores if total is None else total + scores
            print(
                f"  member {k}: {args.ensemble_curvature} all layers λ={best:g} LDS "
                f"{gt.lds(scores):.3f}, mean of {k + 1}: {gt.lds(total / (k + 1)):.3f}",
                flush=True,
            )
        step(f"ensemble of {args.members}, {args.ensemble_curvature} all layers")
    if "hessian" not in args.curvatures and "hessian-layers" not in args.curvatures:
        return
    path = args.hessian_file
    if path is None:
        hess = prob.hessian(args.chunk)
        step(f"Hessian {list(hess.shape)}")
    else:  # built into a file-backed map, read back from it when present
        if not Path(path).exists():
            d = len(prob.theta)
            partial = np.lib.format.open_memmap(path + ".partial.npy", "w+", np.float64, (d, d))
            prob.hessian(args.chunk, out=torch.from_numpy(partial))
            partial.flush()
            del partial
            Path(path + ".partial.npy").rename(path)
            step(f"Hessian [{d}, {d}] into {path}")
        hess = np.load(path, mmap_mode="r")
    scratch = None if path is None else path + ".work.npy"
    if "hessian" in args.curvatures:
        low = smallest_eig(hess)
        print(f"Hessian smallest eigenvalue {low:.3g}", flush=True)
        step("smallest eigenvalue")
        usable = [lam for lam in args.dampings if lam > -low]
        scores = dense_scores(hess, g_te, g_tr, usable, scratch)
        scores = dict.fromkeys(args.dampings) | scores
        report("Hessian, all layers", scores)
        step("Hessian, all layers")
    if "hessian-layers" in args.curvatures:
        blocks = []
        for a, b in prob.layers:
            block = torch.from_numpy(np.array(hess[a:b, a:b]))
            print(f"  layer [{a}:{b}] smallest eigenvalue {smallest_eig(block):.3g}", flush=True)
            blocks.append(dense_scores(block, g_te[:, a:b], g_tr[:, a:b], args.dampings))
        report("Hessian, per layer", summed(blocks))
        step("Hessian, per layer")


if __name__ == "__main__":
    main()
