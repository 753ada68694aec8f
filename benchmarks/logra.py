"""LoGra benchmark: projected_grads against a plain forward+backward and against LogIX.

    python -m benchmarks.logra [--repeats 25] [--models mlp transformer]

For an MLP 784-1024-1024-10 at batch 256 and a 2-layer causal transformer (d=256, 8 × 128
tokens, F.scaled_dot_product_attention), one run prints side by side:

* time of ``projected_grads`` (rank 64 on every nn.Linear, summed cross-entropy) as a ratio to one
  plain forward+backward of the same batch and loss, eager and ``torch.compile(fullgraph=True)``
  (compiled ratios are against the compiled plain step), with and without per-token logs;
* peak extra resident memory of each call (kernel high-water mark reset before the call; the
  process runs with ``MALLOC_MMAP_THRESHOLD_`` so that freed tensors leave it);
* the compression ratio (full per-sample gradient floats / projected floats);
* LogIX's hook-based LoGra (LoRA rank 64 on the same layers, per-sample gradients logged, not
  saved), run by ``benchmarks/logra_logix.py`` in the ``.venv-peers`` virtualenv, on the same
  ratio basis (its own plain forward+backward, measured in its process).

Times are the best of ``--repeats`` interleaved runs after a warm-up call (the best run is the
least disturbed by other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import logix_func as lf

from .logra_models import RANK, best_times, build, linear_layers, peak_extra_mib, summed_ce

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def methods(name: str) -> tuple[dict, dict, dict]:
    """Callables to time, callables that free their leftovers, and sizes."""
    model, batch = build(name)
    x, y = batch
    params = {n: p.detach() for n, p in model.named_parameters()}
    spec = lf.logra(model, RANK, layers=linear_layers(model))
    compiled_model = torch.compile(model)

    def plain(m):
        def step():
            model.zero_grad(set_to_none=True)
            summed_ce(m(x), y).backward()

        return step

    def ours(logs):
        def call(p, b):
            return lf.projected_grads(model, p, b, spec, loss_fn=summed_ce, return_activations=logs)

        return call

    compiled_grads = torch.compile(ours(False), fullgraph=True)
    compiled_logs = torch.compile(ours(True), fullgraph=True)
    runs = {
        "plain eager": plain(model),
        "plain compiled": plain(compiled_model),
        "projected_grads eager": lambda: ours(False)(params, batch),
        "projected_grads compiled": lambda: compiled_grads(params, batch),
        "+ logs eager": lambda: ours(True)(params, batch),
        "+ logs compiled": lambda: compiled_logs(params, batch),
    }
    release = dict.fromkeys(runs, lambda: model.zero_grad(set_to_none=True))
    full = sum(layer.out_features * layer.in_size for layer in spec.layers.values())
    projected = sum(layer.rank_out * layer.rank_in for layer in spec.layers.values())
    sizes = {"full": full, "projected": projected, "layers": len(spec.layers)}
    return runs, release, sizes


def logix_figures(name: str, repeats: int) -> dict | str:
    """LogIX's figures from its own virtualenv, or the reason it could not run."""
    if not PEERS_PYTHON.exists():
        return f"no {PEERS_PYTHON.relative_to(ROOT)} (bash benchmarks/compare/setup_peers.sh)"
    script = Path(__file__).with_name("logra_logix.py")
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run(
        [str(PEERS_PYTHON), str(script), name, str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if done.returncode != 0:
        return "LogIX failed: " + done.stderr.strip().splitlines()[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, repeats: int) -> None:
    runs, release, sizes = methods(name)
    times = best_times(runs, repeats)
    peaks = {k: peak_extra_mib(fn, release[k]) for k, fn in runs.items()}
    base = {"eager": times["plain eager"], "compiled": times["plain compiled"]}
    print(f"\n== {name}: {sizes['layers']} nn.Linear layers, rank {RANK} ==")
    print(f"{'method':28s} {'time (ms)':>10s} {'ratio':>7s} {'peak extra (MiB)':>17s}")
    for key, t in times.items():
        ratio = t / base["compiled" if key.endswith("compiled") else "eager"]
        peak = "n/a" if peaks[key] is None else f"{peaks[key]:.1f}"
        print(f"{key:28s} {1e3 * t:10.1f} {ratio:7.2f} {peak:>17s}")
    print(
        f"compression: {sizes['full']:,} → {sizes['projected']:,} floats per sample "
        f"({sizes['full'] / sizes['projected']:.0f}×)"
    )
    peer = logix_figures(name, repeats)
    if isinstance(peer, str):
        print(f"LogIX: not run — {peer}")
        return
    ratio = peer["logix_s"] / peer["plain_s"]
    print(
        f"LogIX {peer['logix']} (hooks + LoRA, torch {peer['torch']}): "
        f"{1e3 * peer['logix_s']:.1f} ms vs its plain {1e3 * peer['plain_s']:.1f} ms "
        f"→ ratio {ratio:.2f}; peak extra {peer['logix_peak_mib']:.1f} MiB "
        f"(plain {peer['plain_peak_mib']:.1f}); {peer['projected_floats_per_sample']:,} "
        f"floats per sample ({sizes['full'] / peer['projected_floats_per_sample']:.0f}×)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        env = {**os.environ, **MALLOC_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.logra", *sys.argv[1:]], env)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, os load {os.getloadavg()}"
    )
    for name in args.models:
        report(name, args.repeats)


if __name__ == "__main__":
    main()
