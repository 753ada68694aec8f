"""The ``logix-func`` command: the digits demo, and a look at, and scores of, stored runs.

Commands (``logix-func COMMAND --help`` lists each one's options):

- ``demo`` (also what ``logix-func`` runs without a command): trains the reference MLP on
  scikit-learn's digits, logs projected gradients of the training and test images to stores,
  fits the curvature, scores test images and prints and draws their proponents and opponents.
  Every stage resumes from what the run holds for the same options: the model is keyed by the
  seed, the stores by the weights fingerprint and the spec, the factors by what produced them.
- ``inspect STORE``: what a store holds (rows, layers, dtype, bytes, writers, provenance).
- ``score TRAIN QUERY --out SCORES``: influence of every row of a training store on every row
  of a query store (provenance checked), written to a new scores array.
- ``top-k SCORES``: the best training ids per query from stored scores (no rescoring).

Errors print one line on stderr and exit with status 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from typing import Any

from .._version import __version__

COMMANDS = ("demo", "inspect", "score", "top-k")
PROG = "logix-func"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` and flags (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_from(lowest: int) -> Any:
    """An argparse type: an integer ≥ ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            need = "a positive integer" if lowest == 1 else f"≥ {lowest}"
            raise argparse.ArgumentTypeError(f"must be {need}, got {value}")
        return value

    return parse


_positive, _natural = _int_from(1), _int_from(0)


def _version() -> str:
    return __version__


def _parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        description="Data attribution with logix_func. Without a command, runs the demo.",
        formatter_class=_Formatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="digits demo: train, log, fit, score and draw (the default command)",
        description="Train the reference MLP on scikit-learn's digits, log projected gradients "
        "of the training and test images to stores under --run, fit the curvature, score test "
        "images, and print and draw their proponents and opponents. Every stage resumes from "
        "what the run holds for the same options.",
        formatter_class=_Formatter,
    )
    demo.add_argument("--run", default="runs/digits", help="run folder or tensorstore URL")
    demo.add_argument(
        "--rank", type=_natural, default=16, help="LoGra rank per side (0: no projection)"
    )
    demo.add_argument(
        "--preconditioner",
        choices=["ekfac", "kfac", "raw", "ggn", "joint_ggn", "dual_ggn", "auto", "identity"],
        default="auto",
        help="curvature applied to the query gradients (ggn: the exact per-layer GGN in the "
        "projected space; joint_ggn: the GGN of all layers together; dual_ggn: the same, kept "
        "as its samples' rows; auto: where the Fisher is exact, the per-layer GGN where every "
        "block is small, else the dual GGN where samples × classes are few; else EKFAC)",
    )
    demo.add_argument(
        "--fisher",
        choices=["auto", "true", "empirical", "exact"],
        default="auto",
        help="which Fisher the factors estimate (true: labels drawn from the model; auto: the "
        "exact expectation over the labels up to 16 classes, else true)",
    )
    demo.add_argument(
        "--damping",
        type=float,
        default=None,
        help="absolute damping (default: 0.1 × mean eigenvalue per layer)",
    )
    demo.add_argument(
        "--queries",
        type=_natural,
        nargs="+",
        default=[0, 1, 2, 3],
        help="positions in the test split (497 images) to explain",
    )
    demo.add_argument("--top", type=_positive, default=5, help="proponents and opponents shown")
    demo.add_argument(
        "--batch-size", type=_positive, default=100, help="examples per batch when logging"
    )
    demo.add_argument(
        "--figure",
        "--png",
        default=None,
        help="picture path (default: influence.png under the run; memory:// runs draw none "
        "unless given)",
    )
    demo.add_argument(
        "--measurement",
        choices=["loss", "margin"],
        default="loss",
        help="what is attributed for a test image: its cross-entropy, or minus TRAK's margin "
        "(logit of the label against the logsumexp of the others); training rows keep the loss",
    )
    demo.add_argument("--seed", type=_natural, default=0, help="model and projection seed")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=run_demo)

    inspect = sub.add_parser(
        "inspect",
        help="what a store holds: rows, layers, dtype, bytes, writers, provenance",
        description="Print what a store holds, read from its metadata and commit markers.",
        formatter_class=_Formatter,
    )
    inspect.add_argument("store", metavar="STORE", help="store path or tensorstore URL")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead")
    inspect.set_defaults(handler=run_inspect)

    score = sub.add_parser(
        "score",
        help="influence of a training store's rows on a query store's rows",
        description="Score every row of QUERY against every row of TRAIN into a new array "
        "at --out (never replacing data). The stores and the factors must come from the same "
        "weights and projection spec: each records its provenance, and mixing is refused.",
        formatter_class=_Formatter,
    )
    score.add_argument("train", metavar="TRAIN", help="training store (path or URL)")
    score.add_argument("query", metavar="QUERY", help="query store (path or URL)")
    score.add_argument("--out", required=True, help="where to write the scores (new location)")
    score.add_argument(
        "--factors",
        default=None,
        help="curvature factors file, from fit_curvature(cache=) or save_state (default: none, "
        "plain gradient dot products)",
    )
    score.add_argument(
        "--damping",
        type=float,
        default=None,
        help="absolute damping (default: 0.1 × mean eigenvalue per layer)",
    )
    score.add_argument(
        "--mode",
        choices=["dot", "cosine", "l2", "relative"],
        default="dot",
        help="score: dot k(q,t), cosine, l2 (−‖q−t‖²) or relative (RelatIF)",
    )
    score.add_argument(
        "--chunk-rows",
        type=_positive,
        default=None,
        help="training rows per matmul (default: the store's chunk size)",
    )
    score.add_argument("--no-progress", action="store_true", help="hide progress bars")
    score.set_defaults(handler=run_score)

    top = sub.add_parser(
        "top-k",
        help="best training ids per query from stored scores",
        description="Print the top training ids per query row of a scores array written by "
        "'score' or influence(out=), read chunk by chunk without rescoring.",
        formatter_class=_Formatter,
    )
    top.add_argument("scores", metavar="SCORES", help="scores array (path or URL)")
    top.add_argument("--top", type=_positive, default=5, help="ids shown per query")
    top.add_argument(
        "--opponents", action="store_true", help="the lowest scores instead of the highest"
    )
    top.set_defaults(handler=run_top_k)
    return p


def _with_command(argv: list[str] | None) -> list[str]:
    """``argv`` with ``demo`` in front unless it names a command (or asks for help/version)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        return ["demo", *argv]
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(_with_command(argv))
    try:
        args.handler(args, parser)
    except KeyboardInterrupt:
        parser.exit(130, f"{PROG}: interrupted\n")
    except BrokenPipeError:  # the reader of the output stopped (e.g. | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (ValueError, TypeError, KeyError, LookupError, OSError) as e:
        parser.exit(1, f"{PROG}: error: {_one_line(e)}\n")
    except Exception as e:
        from ..store import StoreError

        if not isinstance(e, StoreError):
            raise
        parser.exit(1, f"{PROG}: error: {_one_line(e)}\n")


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


# demo


def print_attributions(data: Any, queries: list[int], helps: Any, hurts: Any) -> None:
    """Each query test image's proponents and opponents: training ids, labels and scores."""
    for i, q in enumerate(queries):
        print(f"test image {q} (label {data.test_y[q].item()}):")
        for title, best in (("proponents", helps), ("opponents", hurts)):
            items = ", ".join(
                f"#{int(t)} (label {data.train_y[int(t)].item()}, {v:+.3g})"
                for t, v in zip(best.ids[i], best.values[i].tolist(), strict=True)
            )
            print(f"  {title}: {items}")


def run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from .. import _cache as caches
    from .._influence import influence, top_k
    from .._origin import spec_hex, weights_fingerprint
    from .._projection import logra
    from ..curvature import load_state, preconditioner, save_state
    from ..pipeline import fit_curvature, log_dataset
    from .digits import digits_split, mlp_model, negative_margin, train_mlp

    data = digits_split(torch.float32)
    bad = [q for q in args.queries if q >= len(data.test_y)]
    if bad:
        parser.error(
            f"--queries {' '.join(map(str, bad))}: out of range, the test split has "
            f"{len(data.test_y)} images (0 to {len(data.test_y) - 1})"
        )
    progress = not args.no_progress
    run = args.run.rstrip("/")
    model = mlp_model(dtype=torch.float32).eval()
    try:
        params = load_state(f"{run}/model-seed{args.seed}.pt")
    except FileNotFoundError:
        params = train_mlp(data.train_x, data.train_y, args.seed)
        save_state(params, f"{run}/model-seed{args.seed}.pt")
    params = {k: v.to(torch.float32) for k, v in params.items()}
    accuracy = torch.func.functional_call(model, params, (data.test_x,)).argmax(1) == data.test_y
    print(f"model: MLP 64-32-10, test accuracy {accuracy.float().mean():.3f}")

    spec = logra(model, rank=args.rank or None, seed=args.seed)
    # what the rows depend on: the weights and the projection
    key = f"{weights_fingerprint(model, params)}-{spec_hex(spec)}"
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=args.batch_size)
    store = log_dataset(model, params, loader, spec, f"{run}/train-{key}", progress=progress)
    print(f"store: {len(store)} training rows at {store.url}")
    tests = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=args.batch_size)
    measure = {"loss": None, "margin": negative_margin}[args.measurement]
    suffix = "" if measure is None else f"-{args.measurement}"
    queries = log_dataset(
        model, params, tests, spec, f"{run}/test-{key}{suffix}", loss_fn=measure, progress=progress
    )
    print(f"queries: {len(queries)} test rows at {queries.url}")

    if args.preconditioner == "identity":
        pre = preconditioner(None)
    else:
        options = dict(method=args.preconditioner, fisher=args.fisher, seed=args.seed)
        factors = fit_curvature(
            model, params, loader, spec, progress=progress, cache=run, **options
        )
        record = caches.curvature_record(model, params, loader, spec, loss_fn=None, **options)
        where = caches.entry(run, f"curvature-{args.preconditioner}", record)
        print(f"factors: {where}")
        pre = preconditioner(factors, args.damping)

    chosen = queries.read(args.queries)  # test rows, logged with the same weights and spec
    scores = influence(chosen, store, preconditioner=pre, query_provenance=queries.provenance)
    helps, hurts = top_k(scores, args.top), top_k(scores, args.top, largest=False)
    print_attributions(data, args.queries, helps, hurts)
    _draw(data, args, run, helps, hurts)


def _draw(data: Any, args: argparse.Namespace, run: str, helps: Any, hurts: Any) -> None:
    """The picture at ``--figure``, else under the run (local or any URL but memory://)."""
    from ..plots import influence_grid
    from ..store.kvstore import write_bytes

    if args.figure is not None:
        influence_grid(data, args.queries, helps, hurts, args.figure)
        print(f"picture: {args.figure}")
    elif "://" not in run or run.startswith("file://"):
        path = os.path.join(run.removeprefix("file://"), "influence.png")
        influence_grid(data, args.queries, helps, hurts, path)
        print(f"picture: {path}")
    elif run.startswith("memory://"):
        print("picture: none for a memory:// run (pass --figure PATH to draw one)")
    else:
        buffer = io.BytesIO()
        influence_grid(data, args.queries, helps, hurts, buffer)
        write_bytes(f"{run}/influence.png", buffer.getvalue())
        print(f"picture: {run}/influence.png")


# inspect, score, top-k


def describe_store(store: Any) -> dict[str, Any]:
    """What ``inspect`` prints: a JSON-serialisable summary of a store."""
    schema = store.schema
    spec = schema.spec or {}
    return {
        "url": store.url,
        "rows": len(store),
        "writers": {str(w): n for w, n in store.writers.items()},
        "ids": schema.ids,
        "dtype": str(schema.dtype).removeprefix("torch."),
        "layers": {name: list(shape) for name, shape in schema.layers.items()},
        "bytes": store.nbytes,
        "codec": schema.codec,
        "chunk_rows": schema.chunk_rows,
        "spec": {"seed": spec.get("seed"), "distribution": spec.get("distribution")}
        if spec
        else None,
        "provenance": store.provenance,
        "created": store.attrs.get("created"),
        "version": store.attrs.get("version"),
    }


def run_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from ..store import LogStore

    info = describe_store(LogStore.open(args.store))
    if args.json:
        print(json.dumps(info, indent=1))
        return
    floats = sum(math.prod(shape) for shape in info["layers"].values())
    print(f"store: {info['url']}")
    print(f"rows: {info['rows']} ({info['ids']} ids)")
    writers = ", ".join(f"{w}: {n}" for w, n in info["writers"].items()) or "none"
    print(f"writers: {writers} (rows per writer id)")
    print(f"dtype: {info['dtype']}, codec {info['codec']}, {info['chunk_rows']} rows per chunk")
    layers = ", ".join(f"{n} {tuple(s)}" for n, s in info["layers"].items())
    print(f"layers: {layers} ({floats} values per row)")
    print(f"bytes: {_size(info['bytes'])} of rows, uncompressed")
    spec = info["spec"]
    if spec:
        print(f"spec: seed {spec['seed']}, {spec['distribution']} projections")
    origin = info["provenance"]
    print(f"provenance: spec {origin['spec']}, weights {origin['weights']}, loss {origin['loss']}")
    print(f"created: {info['created']} by logix_func {info['version']}")


def _size(n: int) -> str:
    """Bytes in B, kB, MB, GB or TB (powers of 1000)."""
    power = min(4, max(0, (len(str(n)) - 1) // 3))
    return f"{n} B" if power == 0 else f"{n / 1000**power:.3g} {' kMGT'[power]}B"


def run_score(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .._influence import influence
    from ..curvature import load_state, preconditioner
    from ..store import LogStore

    train, query = LogStore.open(args.train), LogStore.open(args.query)
    factors = None
    if args.factors is not None:
        factors = load_state(args.factors)
        if isinstance(factors, dict) and set(factors) == {"record", "value"}:
            factors = factors["value"]  # a cache entry of fit_curvature(cache=)
    pre = preconditioner(factors, args.damping)
    rows = query.read(query.ids())
    influence(
        rows,
        train,
        preconditioner=pre,
        mode=args.mode,
        chunk_rows=args.chunk_rows,
        progress=not args.no_progress,
        out=args.out,
        query_provenance=query.provenance,
    )
    print(f"scores: {len(query)} queries × {len(train)} training rows ({args.mode}) at {args.out}")
    print(f"query rows in the order of {query.url}: {_shown(query.ids())}")


def _shown(ids: Any) -> str:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    head = ", ".join(map(str, ids[:8]))
    return head + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")


def run_top_k(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .._influence import top_k

    best = top_k(args.scores, args.top, largest=not args.opponents)
    ids = best.ids.tolist() if hasattr(best.ids, "tolist") else best.ids
    title = "opponents" if args.opponents else "proponents"
    for q, (row, values) in enumerate(zip(ids, best.values.tolist(), strict=True)):
        items = ", ".join(f"{i} ({v:+.3g})" for i, v in zip(row, values, strict=True))
        print(f"query row {q} {title}: {items}")


if __name__ == "__main__":
    main()
