"""LoGra projection specs: seeded, device-independent Kronecker projections.

A :class:`ProjectionSpec` is small, JSON-serialisable data: a seed, a distribution and, for each
covered layer, its gradient layout and ranks. The matrices are *derived* on demand from
``(seed, layer name, side)``: a 64-bit key (BLAKE2b of the three) drives a counter-based
splitmix64 stream, entry ``j`` of a matrix uses counters ``2j`` and ``2j + 1`` only, and Box–Muller
(Gaussian) or the sign bit (Rademacher) turns them into values scaled by ``1/sqrt(k)``. The
computation is integer arithmetic plus float64 NumPy on the CPU, then a single rounding to the
requested dtype and a copy to the requested device, so every process, device and batch split sees
the same bits. Under ``torch.compile`` the generator runs while the graph is traced and its result
is a constant of the graph, so compiled code uses the very same matrices as eager code.

With ``init="pca"`` the matrices are the top eigenvectors of given covariances instead; they are
part of the spec (``spec.pca``) and serialised with it (base64 little-endian float64).
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ._selection import RowSize, human, is_pattern, row_size, select
from .layers import KINDS, LayerSpec, projectable_layers, why_not_projectable

Distribution = Literal["gaussian", "rademacher"]
Rank = int | tuple[int, int] | None
FORMAT = "logix_func.ProjectionSpec"
VERSION = 1
_SIDES = ("out", "in")
LARGE_EMBEDDING_FLOATS = 1 << 18  # 1 MiB per example in float32: warned about by default


@dataclass(frozen=True)
class ProjectionSpec:
    """Seed, distribution and per-layer layouts of a LoGra projection (see module docstring).

    ``layers`` maps module names to :class:`~logix_func.layers.LayerSpec`; ``pca`` maps layer
    names to ``{"out": [k_out, out], "in": [k_in, in']}`` float64 bases (only for PCA init; a side
    whose rank equals its size is the identity and has no entry).
    """

    seed: int
    distribution: Distribution
    layers: dict[str, LayerSpec]
    pca: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"distribution must be 'gaussian' or 'rademacher', got {self.distribution!r}"
            )
        if not self.layers:
            raise ValueError("a projection spec needs at least one layer")
        keys = {}
        for name, layer in self.layers.items():
            _check_layer(name, layer)
            for side in _SIDES:
                rows, cols = _side_shape(layer, side)
                keys[(name, side)] = json.dumps(
                    [self.seed, name, side, rows, cols, self.distribution]
                )
                basis = self.pca.get(name, {}).get(side)
                if basis is not None and tuple(basis.shape) != (rows, cols):
                    raise ValueError(
                        f"pca basis {name!r}/{side} has shape {tuple(basis.shape)}, "
                        f"expected {(rows, cols)}"
                    )
        object.__setattr__(self, "_keys", keys)  # matrix keys for torch.compile (see projector)

    def matrices(
        self, layer: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Float[Tensor, "k_out out"], Float[Tensor, "k_in in_"]]:
        """``(P_out [k_out, out], P_in [k_in, in'])`` of one layer; identity where ``k = size``."""
        if layer not in self.layers:
            raise KeyError(f"no layer {layer!r} in this spec; it has {list(self.layers)}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        out = []
        for side in _SIDES:
            p = self.projector(layer, side, device, dtype)
            size = _side_shape(self.layers[layer], side)[1]
            out.append(torch.eye(size, dtype=dtype, device=device) if p is None else p.clone())
        return out[0], out[1]

    def projector(
        self, layer: str, side: str, device: torch.device, dtype: torch.dtype
    ) -> Tensor | None:
        """One side's matrix (read-only), or None for the identity (rank equal to its size)."""
        return self.projectors([layer], device, dtype)[layer][0 if side == "out" else 1]

    def projectors(
        self, layers: list[str], device: torch.device, dtype: torch.dtype
    ) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """``{layer: (P_out, P_in)}`` (read-only), None for identity sides.

        Under ``torch.compile`` the random ones come from one call of the opaque operator
        ``logix_func::random_matrices``.
        """
        shapes = {(n, side): _side_shape(self.layers[n], side) for n in layers for side in _SIDES}
        random = [k for k, (rows, cols) in shapes.items() if rows < cols and k[0] not in self.pca]
        if torch.compiler.is_compiling():
            keys = "[" + ",".join(self._keys[k] for k in random) + "]"
            made = torch.ops.logix_func.random_matrices(keys, device, dtype)
        else:
            made = [
                random_matrix(
                    self.seed, n, side, *shapes[(n, side)], self.distribution, device, dtype
                )
                for n, side in random
            ]
        matrices = dict(zip(random, made, strict=True))
        for name in layers:
            for side, basis in self.pca.get(name, {}).items():
                matrices[(name, side)] = basis.to(device=device, dtype=dtype)
        return {n: (matrices.get((n, "out")), matrices.get((n, "in"))) for n in layers}

    def dims(self) -> dict[str, tuple[int, int]]:
        """``{layer: (k_out, k_in)}``: the shape of each layer's projected gradient."""
        return {name: (layer.rank_out, layer.rank_in) for name, layer in self.layers.items()}

    def tag(self) -> Int[Tensor, ""]:
        """A 63-bit int64 tag of the spec (of :meth:`to_dict`), kept in curvature states,
        factors and provenance to refuse mixing specs."""
        return json_tag(self.to_dict())

    def row_size(self, dtype: torch.dtype = torch.float32) -> RowSize:
        """What one example's row costs in ``dtype``: ``k_out · k_in`` floats and bytes per
        layer and in total (``print`` it for a table), known before anything is logged."""
        return row_size(self.layers, dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` inverts it exactly."""
        layers = {}
        for name, layer in self.layers.items():
            d = asdict(layer)
            d["in"], d["out"] = d.pop("in_features"), d.pop("out_features")
            if not layer.kind.startswith("conv"):
                d.pop("groups")
            layers[name] = d
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "seed": self.seed,
            "distribution": self.distribution,
            "layers": layers,
        }
        if self.pca:
            out["pca"] = {
                name: {side: _encode(t) for side, t in bases.items()}
                for name, bases in self.pca.items()
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProjectionSpec:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(
                f"not a {FORMAT} version {VERSION} dict (format={data.get('format')!r}, "
                f"version={data.get('version')!r})"
            )
        layers = {}
        for name, d in data["layers"].items():
            d = dict(d)
            d["in_features"], d["out_features"] = d.pop("in"), d.pop("out")
            layers[name] = LayerSpec(**d)
        pca = {
            name: {side: _decode(enc) for side, enc in bases.items()}
            for name, bases in data.get("pca", {}).items()
        }
        return cls(int(data["seed"]), data["distribution"], layers, pca)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProjectionSpec):
            return NotImplemented
        same_pca = self.pca.keys() == other.pca.keys() and all(
            self.pca[n].keys() == other.pca[n].keys()
            and all(torch.equal(self.pca[n][s], other.pca[n][s]) for s in self.pca[n])
            for n in self.pca
        )
        head = (self.seed, self.distribution, self.layers)
        return head == (other.seed, other.distribution, other.layers) and same_pca

    __hash__ = None  # mutable-looking contents (dicts, tensors)


def json_tag(payload: Mapping[str, Any]) -> Int[Tensor, ""]:
    """The 63-bit int64 tag of a JSON-serialisable spec dict (``ProjectionSpec.tag`` of its
    ``to_dict``; also the tag of a store schema's spec that is not a ProjectionSpec's)."""
    digest = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).digest()
    return torch.tensor(int.from_bytes(digest, "little") >> 1, dtype=torch.int64)


def _side_shape(layer: LayerSpec, side: str) -> tuple[int, int]:
    if side == "out":
        return layer.rank_out, layer.out_features
    if side == "in":
        return layer.rank_in, layer.in_size
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def _check_layer(name: str, layer: LayerSpec) -> None:
    if layer.kind not in KINDS:
        raise ValueError(f"layer {name!r}: unknown kind {layer.kind!r}")
    for side in _SIDES:
        rank, size = _side_shape(layer, side)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= size:
            raise ValueError(
                f"layer {name!r}: rank_{side} must be an int in [1, {size}], got {rank}"
            )


def _encode(t: Tensor) -> dict[str, Any]:
    data = t.detach().cpu().to(torch.float64).numpy().astype("<f8").tobytes()
    return {"dtype": "float64", "shape": list(t.shape), "data": base64.b64encode(data).decode()}


def _decode(enc: Mapping[str, Any]) -> Tensor:
    if enc.get("dtype") != "float64":
        raise ValueError(f"pca payload must be float64, got {enc.get('dtype')!r}")
    array = np.frombuffer(base64.b64decode(enc["data"]), dtype="<f8").reshape(enc["shape"])
    return torch.from_numpy(array.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# the generator

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_CACHE_BYTES = 1 << 30
_cache: OrderedDict[tuple, Tensor] = OrderedDict()  # memo of a pure function, bounded by bytes


def stream_key(seed: int, layer: str, side: str) -> int:
    """The 64-bit key of one matrix: BLAKE2b of ``(seed, layer, side)``."""
    digest = hashlib.blake2b(f"{seed}\x00{layer}\x00{side}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def splitmix64(key: int, counters: np.ndarray) -> np.ndarray:
    """splitmix64 outputs for ``counters`` (uint64) of the stream ``key`` (wrapping arithmetic)."""
    z = np.uint64(key) + (counters + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def random_matrix_numpy(
    seed: int, layer: str, side: str, rows: int, cols: int, distribution: str
) -> np.ndarray:
    """The float64 matrix ``[rows, cols]`` of one side, entries of variance ``1/rows``."""
    key = stream_key(seed, layer, side)
    n = rows * cols
    with np.errstate(over="ignore"):
        if distribution == "rademacher":
            bits = splitmix64(key, np.arange(n, dtype=np.uint64))
            values = 1.0 - 2.0 * (bits >> np.uint64(63)).astype(np.float64)
        else:
            bits = splitmix64(key, np.arange(2 * n, dtype=np.uint64)).reshape(n, 2)
            u1 = ((bits[:, 0] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # (0, 1)
            u2 = (bits[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
            values = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (values / np.sqrt(rows)).reshape(rows, cols)


def random_matrix(
    seed: int,
    layer: str,
    side: str,
    rows: int,
    cols: int,
    distribution: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """The seeded matrix of one side on ``device`` in ``dtype`` (memoised: treat as read-only)."""
    key = (seed, layer, side, rows, cols, distribution, str(device), dtype)
    hit = _cache.get(key)
    if hit is None:
        array = random_matrix_numpy(seed, layer, side, rows, cols, distribution)
        hit = torch.from_numpy(array).to(device=device, dtype=dtype)
        _cache[key] = hit
        while len(_cache) > 1 and sum(t.nbytes for t in _cache.values()) > _CACHE_BYTES:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return hit


_LIB = torch.library.Library("logix_func", "DEF")
_LIB.define("random_matrices(str keys, Device device, ScalarType dtype) -> Tensor[]")


def _random_matrices(keys: str, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """Several :func:`random_matrix` at once; ``keys`` is the JSON list of their arguments.

    This operator is what ``torch.compile``d code calls: opaque to the compiler, so compiled
    code uses the very bits of eager code, and one call per pass whatever the number of layers.
    """
    return [random_matrix(*key, device, dtype).clone() for key in json.loads(keys)]


def _random_matrices_shapes(keys: str, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    return [torch.empty(k[3], k[4], device=device, dtype=dtype) for k in json.loads(keys)]


_LIB.impl("random_matrices", _random_matrices, "CompositeExplicitAutograd")
torch.library.register_fake("logix_func::random_matrices", _random_matrices_shapes, lib=_LIB)


# ---------------------------------------------------------------------------------------------
# building a spec


def logra(
    model: nn.Module,
    rank: Rank = 64,
    *,
    seed: int = 0,
    layers: list[str] | None = None,
    exclude: list[str] | None = None,
    init: Literal["random", "pca"] = "random",
    distribution: Distribution = "gaussian",
    covariances: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> ProjectionSpec:
    """A LoGra projection spec for ``model``'s projectable layers.

    Args:
        model: the model; only read (module types and parameter shapes).
        rank: ``k`` for both sides (capped at each side's size), ``(k_out, k_in)``, or ``None``
            for no projection (identity on both sides: full gradients, same layout).
        seed: the seed of the random matrices, in ``[0, 2**63)``.
        layers: module names or glob patterns to cover (``"transformer.h.*.mlp.*"``; a pattern
            also matches weight names, ``"*.weight"``); ``None`` = every projectable module.
            A weight shared by several modules (tied embeddings) is covered once, by the first
            of them. A pattern that matches nothing is an error listing the layers.
        exclude: names or patterns of layers to leave out of that selection (e.g.
            ``["*embeddings*"]``).
        init: ``"random"`` or ``"pca"`` (top eigenvectors of ``covariances``).
        distribution: ``"gaussian"`` or ``"rademacher"``, entries scaled by ``1/sqrt(k)``.
        covariances: for ``init="pca"``: ``{layer: {"A": [in', in'], "S": [out, out]}}``, the
            covariance of the layer's inputs (bias column of ones included) and of its output
            gradients, e.g. KFAC factors.
    """
    found = projectable_layers(model)
    literal = layers is not None and not any(is_pattern(p) for p in _names(layers, "layers"))
    if layers is None:
        names = list(found)
    elif literal:
        names = _check_names(model, found, layers)
    else:
        _check_names(model, found, [p for p in layers if not is_pattern(p)])
        names = select(found, layers)
    if exclude is not None:
        dropped = set(select(found, _names(exclude, "exclude"), what="exclude"))
        names = [n for n in names if n not in dropped]
    names = _untied(model, found, names, explicit=literal)
    if not names:
        raise ValueError(f"{type(model).__name__} has no projectable layer left to cover")
    specs = {name: found[name].with_ranks(*_ranks(rank, found[name], name)) for name in names}
    if layers is None:
        _warn_large_embeddings(specs)
    if init == "random":
        if covariances is not None:
            raise ValueError("covariances are only used with init='pca'")
        return ProjectionSpec(seed, distribution, specs)
    if init != "pca":
        raise ValueError(f"init must be 'random' or 'pca', got {init!r}")
    if rank is None:
        raise ValueError("init='pca' needs a rank (rank=None means no projection)")
    pca = {name: _pca_bases(name, spec, covariances) for name, spec in specs.items()}
    return ProjectionSpec(seed, distribution, specs, {n: b for n, b in pca.items() if b})


def _names(names: list[str], what: str) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list of module names or patterns, not a string")
    return list(names)


def _warn_large_embeddings(specs: dict[str, LayerSpec]) -> None:
    """Warn, with the figures, about default-covered embeddings of over 1 MiB per example."""
    size = row_size(specs)
    large = [
        n
        for n, layer in specs.items()
        if layer.kind == "embedding" and size.floats[n] > LARGE_EMBEDDING_FLOATS
    ]
    if large:
        each = ", ".join(f"{n} {human(size.bytes[n])}" for n in large)
        warnings.warn(
            f"logra covers large embeddings by default: {each} of every example's "
            f"{human(size.total_bytes)} row (float32); leave them out with exclude={large} "
            "or choose a smaller rank",
            stacklevel=3,
        )


def _check_names(model: nn.Module, found: dict[str, LayerSpec], layers: list[str]) -> list[str]:
    modules = dict(model.named_modules())
    for name in layers:
        if name in found:
            continue
        if name not in modules:
            sample = ", ".join(list(found)[:5])
            raise KeyError(f"no module named {name!r} in the model (projectable ones: {sample})")
        raise ValueError(
            f"layer {name!r} cannot be projected: it is {why_not_projectable(modules[name])}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers contains duplicates: {layers}")
    return list(layers)


def _untied(
    model: nn.Module, found: dict[str, LayerSpec], names: list[str], explicit: bool
) -> list[str]:
    """``names`` with one module per weight: a tied weight (input and output embeddings) is
    covered once, by its first module; projected_grads adds the other modules' uses to it."""
    every = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    for name in names:
        key = id(every[found[name].weight])
        if key in first and explicit:
            raise ValueError(
                f"layers {first[key]!r} and {name!r} share one weight (tied parameters): list "
                "one of them; it covers the shared weight, every module using it included"
            )
        first.setdefault(key, name)
    return list(first.values())


def _ranks(rank: Rank, layer: LayerSpec, name: str) -> tuple[int, int]:
    """``(k_out, k_in)`` for one layer, capped at the sides' sizes."""
    if rank is None:
        return layer.out_features, layer.in_size
    pair = (rank, rank) if isinstance(rank, int) else rank
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in pair)
    ):
        raise ValueError(f"rank must be a positive int, a pair (k_out, k_in) or None; got {rank!r}")
    return min(pair[0], layer.out_features), min(pair[1], layer.in_size)


def _pca_bases(
    name: str, layer: LayerSpec, covariances: Mapping[str, Mapping[str, Tensor]] | None
) -> dict[str, Tensor]:
    """Top eigenvectors (rows, float64) of the needed sides' covariances."""
    bases = {}
    for side, key in (("out", "S"), ("in", "A")):
        rows, size = _side_shape(layer, side)
        if rows == size:
            continue
        cov = (covariances or {}).get(name, {}).get(key)
        if cov is None:
            raise KeyError(f"init='pca' needs covariances[{name!r}][{key!r}] ([{size}, {size}])")
        cov = torch.as_tensor(cov).detach().cpu().to(torch.float64)
        if cov.shape != (size, size) or not torch.isfinite(cov).all():
            raise ValueError(
                f"covariances[{name!r}][{key!r}] must be a finite [{size}, {size}] matrix, "
                f"got shape {tuple(cov.shape)}"
            )
        _, vectors = torch.linalg.eigh(0.5 * (cov + cov.T))
        top = vectors[:, -rows:].flip(-1).T.contiguous()  # [rows, size], largest first
        signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        bases[side] = top * signs  # deterministic sign: largest entry positive
    return bases
