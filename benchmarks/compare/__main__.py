"""Side-by-side comparison with LogIX, Kronfluence and TRAK on the digits reference problems.

    python -m benchmarks.compare [--peers-venv .venv-peers] [--threads 1] [--repeats 1]

Installs the peers into their own virtualenv if it is missing (``setup_peers.sh``; the path
comes from ``--peers-venv``, else ``$PEERS_VENV``, else ``.venv-peers``), writes each problem
once (the trained weights and the data, float32 by default), then runs every tool's pipeline
in its own process (ours with this python and this checkout's ``logix_func``, the peers with
the virtualenv's python) and scores its output against the ground truth:

* the digits MLP 64-128-128-10 (``tests/data/lds_deep_mlp.npz``, its seed-0 model): LDS over
  256 half subsets, each retrained with 5 seeds, mean Spearman over the 497 test examples
  (``logix_func.lds``, measurement = loss);
* the digits logistic regression with a constant input and no bias
  (``tests/data/loo_logreg_constant.npz``): Pearson correlation of ``score / N`` with the
  exact leave-one-out change of 20 test losses for 100 removals, all drawn at random.

Both ground truths come from ``benchmarks/ground_truth`` on splits other than the reference one
that the package's defaults were chosen on (docs/validation.md).

Prints a markdown table (also written to ``benchmarks/compare/results.md`` and into
``benchmarks/README.md``) and plots end-to-end time against accuracy
(``benchmarks/compare/results.png``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import logix_func as lf
from logix_func.demo import digits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
README = ROOT / "benchmarks" / "README.md"
MARKERS = ("<!-- compare:start -->", "<!-- compare:end -->")
GOAL = 3.0

# key, label, runner, which python, options
TOOLS = [
    ("ours-logra", "logix_func LoGra 64, default (auto)", "run_ours.py", "ours", {"rank": 64}),
    ("ours-full", "logix_func full, default (auto)", "run_ours.py", "ours", {"rank": None}),
    (
        "ours-logra-ekfac",
        "logix_func LoGra 64 + EKFAC",
        "run_ours.py",
        "ours",
        {"rank": 64, "method": "ekfac"},
    ),
    (
        "ours-full-ekfac",
        "logix_func full + EKFAC",
        "run_ours.py",
        "ours",
        {"rank": None, "method": "ekfac"},
    ),
    (
        "ours-full-true",
        "logix_func full + EKFAC, sampled labels",
        "run_ours.py",
        "ours",
        {"rank": None, "fisher": "true"},
    ),
    ("logix", "LogIX LoGra 64 + EKFAC", "run_logix.py", "peers", {"rank": 64}),
    ("kronfluence", "Kronfluence EKFAC", "run_kronfluence.py", "peers", {}),
    ("trak", "TRAK proj 256", "run_trak.py", "peers", {"proj_dim": 256}),
]
PROBLEMS = ("mlp", "logreg")


def peers_python(venv: Path) -> Path:
    """The virtualenv's python, building the virtualenv first if it is missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"building {venv} (benchmarks/compare/setup_peers.sh)", flush=True)
        subprocess.run(["bash", str(HERE / "setup_peers.sh"), str(venv)], cwd=ROOT, check=True)
    return python


def write_problems(root: Path, dtype: torch.dtype) -> dict[str, dict]:
    """Write ``{root}/{problem}.pt`` and return each problem's ground truth."""
    from benchmarks.ground_truth import lds_deep_mlp, loo_logreg_constant

    mlp = np.load(ROOT / "tests" / "data" / "lds_deep_mlp.npz")
    loo = np.load(ROOT / "tests" / "data" / "loo_logreg_constant.npz")
    splits = {
        "mlp": digits.digits_split(seed=lds_deep_mlp.SPLIT_SEED),
        "logreg": loo_logreg_constant.constant_split(),
    }
    params = {
        "mlp": {k.removeprefix("param0/"): mlp[k] for k in mlp.files if k.startswith("param0/")},
        "logreg": {"0.weight": loo["weight"]},
    }
    test = torch.as_tensor(loo["test"])
    queries = {
        "mlp": (splits["mlp"].test_x, splits["mlp"].test_y),
        "logreg": (splits["logreg"].test_x[test], splits["logreg"].test_y[test]),
    }
    for name in PROBLEMS:
        torch.save(
            {
                "name": name,
                "params": {k: torch.from_numpy(v).to(dtype) for k, v in params[name].items()},
                "train": (splits[name].train_x.to(dtype), splits[name].train_y),
                "query": (queries[name][0].to(dtype), queries[name][1]),
            },
            root / f"{name}.pt",
        )
    outputs = mlp["loss_per_seed"].astype(np.float64).mean(axis=1)
    return {
        "mlp": {"masks": mlp["masks"], "outputs": outputs},
        "logreg": {"removed": loo["removed"], "delta": loo["delta_loss"], "n": int(loo["n_train"])},
    }


def accuracy(problem: str, scores: np.ndarray, truth: dict) -> float:
    """LDS (MLP) or leave-one-out Pearson correlation (logistic regression)."""
    if problem == "mlp":
        return lf.lds(scores, truth["masks"], truth["outputs"], measurement="loss")[0]
    predicted = scores[:, truth["removed"]] / truth["n"]
    return lf.loo_correlation(predicted, truth["delta"])[0]


def run_tool(tool, problem: str, root: Path, pythons: dict, args) -> dict:
    """Run one tool on one problem ``args.repeats`` times; the record of the fastest run."""
    key, _, runner, which, options = tool
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(ROOT),
        "TQDM_DISABLE": "1",
    }
    best = None
    for repeat in range(args.repeats):
        work = Path(tempfile.mkdtemp(prefix=f"{key}-{problem}-", dir=root))
        result = root / f"{key}-{problem}-{repeat}.json"
        cmd = [str(pythons[which]), str(HERE / runner), str(root / f"{problem}.pt"), str(work)]
        cmd += [str(result), f"--threads={args.threads}", f"--batch-size={args.batch_size}"]
        cmd += ["--options", json.dumps(options)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"{runner} failed: {tail}", "log": done.stderr}
        record = json.loads(result.read_text())
        record["scores"] = np.load(result.with_suffix(".npy"))
        if best is None or record["total_s"] < best["total_s"]:
            best = record
    return best


def table(results: dict) -> str:
    head = (
        "| problem | tool | extract (s) | curvature (s) | score (s) | end to end (s) "
        "| end to end, CPU (s) | peak RSS extra (MiB) | on disk (MiB) | accuracy |"
    )
    lines = [head, "|" + "---|" * 10]
    for problem in PROBLEMS:
        metric = "LDS" if problem == "mlp" else "LOO r"
        for key, label, *_ in TOOLS:
            r = results[problem].get(key)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {problem} | {label} | {r['error']} |||||||")
                continue
            extract, curvature, score = (
                f"{r['stages_s'][s]:.2f}" if s in r["stages_s"] else "—"
                for s in ("extract", "curvature", "score")
            )
            lines.append(
                f"| {problem} | {label} | {extract} | {curvature} "
                f"| {score} | {sum(r['stages_s'].values()):.2f} "
                f"| {sum(r['stages_cpu_s'].values()):.2f} "
                f"| {r['peak_extra_mib']:.0f} | {r['disk_bytes'] / 2**20:.2f} "
                f"| {metric} {r['accuracy']:.3f} |"
            )
    return "\n".join(lines)


def verdict(results: dict) -> list[str]:
    """Per peer: our fastest variant at equal or better accuracy and its speed-up over the peer."""
    ours = [k for k, *_ in TOOLS if k.startswith("ours")]
    seconds = lambda r: sum(r["stages_s"].values())  # noqa: E731
    lines = []
    for problem in PROBLEMS:
        res = {k: r for k, r in results[problem].items() if "error" not in r}
        for key, label, *_ in TOOLS:
            if key in ours or key not in res:
                continue
            peer = res[key]
            fit = [res[k] for k in ours if k in res and res[k]["accuracy"] >= peer["accuracy"]]
            if not fit:
                lines.append(f"- {problem}, {label}: no variant of ours run reaches its accuracy")
                continue
            best = min(fit, key=seconds)
            speedup = seconds(peer) / seconds(best)
            cpu = sum(peer["stages_cpu_s"].values()) / sum(best["stages_cpu_s"].values())
            met = "met" if speedup >= GOAL else "**not met**"
            lines.append(
                f"- {problem}, vs {label}: {best['label']} is {speedup:.1f}× faster "
                f"({seconds(best):.2f} s vs {seconds(peer):.2f} s; CPU time {cpu:.1f}×) at "
                f"{best['accuracy']:.3f} vs {peer['accuracy']:.3f}: {GOAL:g}× goal {met}"
            )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, problem in zip(axes, PROBLEMS, strict=True):
        for i, (key, label, *_) in enumerate(TOOLS):
            r = results[problem].get(key)
            if r is None or "error" in r:
                continue
            marker = "o" if key.startswith("ours") else "s"
            t = sum(r["stages_s"].values())
            ax.scatter(t, r["accuracy"], s=70, marker=marker, color=colors[i], label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("end-to-end time (s, log scale)")
        ax.set_ylabel("LDS" if problem == "mlp" else "leave-one-out Pearson r")
        ax.set_title("digits MLP" if problem == "mlp" else "digits logistic regression")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def update_readme(section: str) -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{MARKERS[0]}\n{section}\n{MARKERS[1]}"
    if MARKERS[0] in text:
        before, rest = text.split(MARKERS[0], 1)
        text = before + block + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_venv = os.environ.get("PEERS_VENV", str(ROOT / ".venv-peers"))
    parser.add_argument("--peers-venv", type=Path, default=Path(default_venv))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=325)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool; the fastest counts")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--tools", nargs="+", default=[t[0] for t in TOOLS])
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = parser.parse_args(argv)
    pythons = {"ours": Path(sys.executable), "peers": peers_python(args.peers_venv)}
    load = os.getloadavg()
    header = (
        f"torch {torch.__version__}, {args.threads} thread(s) per tool, batch {args.batch_size}, "
        f"{args.dtype}, best of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {load[0]:.1f} at start; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(header, flush=True)
    results: dict[str, dict] = {p: {} for p in PROBLEMS}
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        root = Path(tmp)
        truth = write_problems(root, getattr(torch, args.dtype))
        for problem in PROBLEMS:
            for tool in TOOLS:
                if tool[0] not in args.tools:
                    continue
                record = run_tool(tool, problem, root, pythons, args)
                if "error" not in record:
                    record["accuracy"] = accuracy(problem, record.pop("scores"), truth[problem])
                record["label"] = tool[1]
                results[problem][tool[0]] = record
                status = record.get("error") or f"{sum(record['stages_s'].values()):.2f} s"
                print(f"  {problem:6s} {tool[1]:28s} {status}", flush=True)
    section = "\n".join(
        [
            "## Comparison with LogIX, Kronfluence and TRAK",
            "",
            f"`python -m benchmarks.compare` — {header}.",
            "",
            table(results),
            "",
            f"Goal: ours at least {GOAL:g}× faster end to end than each peer at equal or better "
            "accuracy.",
            "",
            *verdict(results),
        ]
    )
    print("\n" + section)
    if not args.no_write:
        (HERE / "results.md").write_text(section + "\n")
        plot(results, HERE / "results.png")
        update_readme(section)


if __name__ == "__main__":
    main()
