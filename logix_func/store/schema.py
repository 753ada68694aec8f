"""What a store holds: layer row shapes, dtype, data-id type, and what produced the rows."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import ml_dtypes
import numpy as np
import torch
from torch import Tensor, nn

from .errors import SchemaError, listed

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
CODECS = ("zstd", "blosc", "none")
TARGET_CHUNK_BYTES = 16 << 20  # one chunk of rows across all layers
MAX_CHUNK_ROWS = 1 << 16
MAX_CHUNK_BYTES = 1 << 30  # one array's chunk; crafted sizes beyond are refused, not allocated


def model_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """``{parameter name: shape}`` of ``model``: enough to tell a store's model from another."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def _json_copy(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{what} must be JSON-serialisable: {e}") from None


def _auto_chunk_rows(row_bytes: int) -> int:
    rows = max(1, TARGET_CHUNK_BYTES // max(row_bytes, 1))
    return min(MAX_CHUNK_ROWS, 1 << int(math.log2(rows)))


@dataclass(frozen=True)
class StoreSchema:
    """Layout of a store's rows.

    Args:
        layers: ``{layer name: row shape}``; a row of shape ``(k_out, k_in)`` is stored
            flattened and read back with that shape.
        dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16`` (stored bit-exact).
        ids: ``"int"`` (int64 data ids) or ``"str"`` (UTF-8 strings of at most ``id_bytes``).
        spec: projection spec, any JSON-serialisable dict (or ``None``).
        fingerprint: ``model_fingerprint(model)`` (or ``None``).
        weights: ``weights_fingerprint(model, params)`` of the weights that produced the rows
            (or ``None``): a store holds rows of one set of weights.
        loss: name of the loss (measurement) whose gradients the rows are (or ``None``).
        codec: ``"zstd"`` (default), ``"blosc"`` (byte shuffle + zstd) or ``"none"``.
        chunk_rows: rows per stored chunk; ``None`` picks a power of two near 16 MiB per chunk.
        id_bytes: width of string ids in bytes.
    """

    layers: Mapping[str, tuple[int, ...]]
    dtype: torch.dtype = torch.float32
    ids: Literal["int", "str"] = "int"
    spec: dict | None = None
    fingerprint: dict | None = None
    codec: str = "zstd"
    chunk_rows: int | None = None
    id_bytes: int = 64
    weights: str | None = None
    loss: str | None = None
    row_sizes: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping) or not self.layers:
            raise SchemaError("layers must be a non-empty {name: row shape} dict")
        layers = {}
        for name, shape in self.layers.items():
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                raise SchemaError(f"layer name {name!r} must be a non-empty string without '/'")
            shape = tuple(int(s) for s in shape)
            if any(s <= 0 for s in shape):
                raise SchemaError(f"layer {name!r}: row shape {shape} has a non-positive size")
            layers[name] = shape
        if self.dtype not in DTYPE_NAMES:
            raise SchemaError(f"dtype {self.dtype} not supported; use one of {list(DTYPE_NAMES)}")
        if self.ids not in ("int", "str"):
            raise SchemaError(f"ids must be 'int' or 'str', got {self.ids!r}")
        if self.codec not in CODECS:
            raise SchemaError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.id_bytes < 1:
            raise SchemaError(f"id_bytes must be positive, got {self.id_bytes}")
        for what in ("weights", "loss"):
            if not isinstance(getattr(self, what), (str, type(None))):
                raise SchemaError(f"{what} must be a string or None, got {getattr(self, what)!r}")
        sizes = {name: math.prod(shape) for name, shape in layers.items()}
        row_bytes = sum(sizes.values()) * self.dtype.itemsize
        chunk_rows = _auto_chunk_rows(row_bytes) if self.chunk_rows is None else self.chunk_rows
        if int(chunk_rows) < 1:
            raise SchemaError(f"chunk_rows must be positive, got {chunk_rows}")
        widest = max(max(sizes.values()) * self.dtype.itemsize, 8, self.id_bytes)
        if int(chunk_rows) * widest > MAX_CHUNK_BYTES:
            raise SchemaError(
                f"a chunk of {chunk_rows} rows of {widest} bytes exceeds {MAX_CHUNK_BYTES} "
                "bytes: lower chunk_rows (or the row size)"
            )
        set_ = object.__setattr__
        set_(self, "layers", layers)
        set_(self, "spec", _json_copy(self.spec, "spec"))
        set_(self, "fingerprint", _json_copy(self.fingerprint, "fingerprint"))
        set_(self, "chunk_rows", int(chunk_rows))
        set_(self, "row_sizes", sizes)

    @classmethod
    def from_rows(
        cls, rows: Mapping[str, Tensor], data_ids: Any = None, **kwargs: Any
    ) -> StoreSchema:
        """Schema of a first batch ``rows = {layer: [B, *shape]}`` (ids type from ``data_ids``)."""
        dtypes = {t.dtype for t in rows.values()}
        if len(dtypes) != 1:
            raise SchemaError(f"rows mix dtypes {sorted(map(str, dtypes))}; cast them to one")
        if data_ids is not None and "ids" not in kwargs:
            is_str = not isinstance(data_ids, (Tensor, np.ndarray)) and any(
                isinstance(i, str) for i in data_ids
            )
            kwargs["ids"] = "str" if is_str else "int"
        layers = {name: tuple(t.shape[1:]) for name, t in rows.items()}
        return cls(layers=layers, dtype=dtypes.pop(), **kwargs)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(NUMPY_DTYPES[DTYPE_NAMES[self.dtype]])

    def to_json(self) -> dict:
        return {
            "layers": {name: list(shape) for name, shape in self.layers.items()},
            "dtype": DTYPE_NAMES[self.dtype],
            "ids": self.ids,
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "codec": self.codec,
            "chunk_rows": self.chunk_rows,
            "id_bytes": self.id_bytes,
            "weights": self.weights,
            "loss": self.loss,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreSchema:
        dtype = {v: k for k, v in DTYPE_NAMES.items()}[data["dtype"]]
        return cls(**{**data, "dtype": dtype, "layers": dict(data["layers"])})

    def differences(self, other: StoreSchema) -> list[str]:
        """Names and values of the fields where ``other`` differs from this schema."""
        mine, theirs = self.to_json(), other.to_json()
        return [
            f"{k}: store has {mine[k]!r}, got {theirs[k]!r}" for k in mine if mine[k] != theirs[k]
        ]

    def rows_to_numpy(self, rows: Mapping[str, Tensor], batch: int) -> dict:
        """Check ``{layer: [batch, *shape]}``; returns numpy ``{layer: [batch, size]}``."""
        if not isinstance(rows, Mapping):
            raise SchemaError(f"rows must be a {{layer: Tensor}} dict, got {type(rows).__name__}")
        missing = [n for n in self.layers if n not in rows]
        extra = [n for n in rows if n not in self.layers]
        if missing or extra:
            raise SchemaError(
                f"rows do not match the store's layers: missing {missing}, unknown {extra} "
                f"(store layers: {list(self.layers)})"
            )
        out = {}
        for name, shape in self.layers.items():
            t = rows[name]
            if not isinstance(t, Tensor):
                raise SchemaError(
                    f"layer {name!r}: expected a torch.Tensor, got {type(t).__name__}"
                )
            if t.dtype != self.dtype:
                raise SchemaError(
                    f"layer {name!r}: dtype {t.dtype} but the store holds {self.dtype}; "
                    f"cast with .to({self.dtype})"
                )
            if tuple(t.shape) != (batch, *shape):
                raise SchemaError(
                    f"layer {name!r}: shape {tuple(t.shape)}, expected {(batch, *shape)} "
                    f"({batch} data ids, row shape {shape})"
                )
            out[name] = tensor_to_numpy(t).reshape(batch, self.row_sizes[name])
        return out

    def encode_ids(self, data_ids: Any) -> tuple[np.ndarray, list]:
        """``(stored form [B, width], python ids)`` of ``data_ids``, checked against the schema."""
        if self.ids == "int":
            if isinstance(data_ids, (Tensor, np.ndarray)):
                arr = data_ids.detach().cpu().numpy() if isinstance(data_ids, Tensor) else data_ids
                if arr.ndim != 1 or arr.dtype.kind not in "iu":
                    raise SchemaError(
                        f"data ids must be a 1-d integer array, got {arr.dtype} {arr.shape}"
                    )
                arr = arr.astype(np.int64)
            else:
                keys = list(data_ids)
                bad = [
                    i for i in keys if isinstance(i, bool) or not isinstance(i, (int, np.integer))
                ]
                if bad:
                    raise SchemaError(f"this store has int data ids; got {listed(bad)}")
                arr = np.asarray(keys, dtype=np.int64)
            return arr.reshape(-1, 1), arr.tolist()
        if isinstance(data_ids, (str, bytes, Tensor, np.ndarray)):
            raise SchemaError("this store has string data ids: pass a list of str")
        keys = list(data_ids)
        bad = [i for i in keys if not isinstance(i, str)]
        if bad:
            raise SchemaError(f"this store has string data ids; got {listed(bad)}")
        encoded = [k.encode() for k in keys]
        width = self.id_bytes
        bad = [k for k, e in zip(keys, encoded, strict=True) if len(e) > width or b"\0" in e]
        if bad:
            raise SchemaError(
                f"string ids longer than {width} UTF-8 bytes or with NUL: {listed(bad)}"
            )
        raw = np.array(encoded, dtype=f"S{width}").view(np.uint8).reshape(len(keys), width)
        return raw, keys

    def id_column(self, raw: np.ndarray) -> np.ndarray:
        """Stored ids ``[n, width]`` as a 1-d array: int64, or fixed-width bytes for strings."""
        if self.ids == "int":
            return np.ascontiguousarray(raw[:, 0])
        if len(raw) == 0:
            return np.zeros(0, f"S{self.id_bytes}")
        return np.ascontiguousarray(raw).view(f"S{self.id_bytes}")[:, 0]

    def id_keys(self, column: np.ndarray) -> list:
        """Python ids (int or str) of an id column."""
        return column.tolist() if self.ids == "int" else [b.decode() for b in column.tolist()]


def tensor_to_numpy(t: Tensor) -> np.ndarray:
    """A CPU numpy view of ``t`` (bfloat16 as ``ml_dtypes.bfloat16``, bit-exact)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_tensor(a: np.ndarray) -> Tensor:
    """A tensor sharing ``a``'s memory (bfloat16 bit-exact)."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
