"""The ``logix-func`` command run as a subprocess: exit codes, messages, outputs under the run."""

import argparse
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch

import logix_func as lf
from logix_func.demo.cli import _parser, main

ROOT = Path(__file__).parent.parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "logix_func", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=300,
    )


def one_line_error(result: subprocess.CompletedProcess, code: int, *parts: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_help_shows_defaults_and_every_option_is_explained():
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "inspect", "score", "top-k"}
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    demo = commands.choices["demo"].format_help()
    assert "(default: runs/digits)" in demo and "(default: 16)" in demo


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``main(args)`` in this process, as a CompletedProcess (faster than a subprocess)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_version_help_and_bad_values_as_one_line(capsys):
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"logix-func {version('logix-func')}"
    one_line_error(cli("--queries", "9999"), 2, "--queries 9999", "497 images (0 to 496)")
    result = in_process(capsys, "--help")
    assert result.returncode == 0 and "Without a command, runs the demo" in result.stdout
    one_line_error(in_process(capsys, "--top", "0"), 2, "--top", "must be a positive integer")
    one_line_error(in_process(capsys, "inspect", "/nonexistent"), 1, "no logix_func store at")
    for bad in ("-1", "x"):
        one_line_error(in_process(capsys, "demo", "--batch-size", bad), 2, "--batch-size")


def test_a_memory_run_draws_no_picture_in_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = in_process(capsys, "--run", "memory://demo", "--rank", "2", "--queries", "3")
    assert result.returncode == 0, result.stderr
    assert "picture: none for a memory:// run (pass --figure PATH" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_inspect_score_and_top_k_of_a_stored_run(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--run", str(run), "--rank", "4", "--queries", "0", "1", "--top", "3"]
    main([*args, "--preconditioner", "ekfac", "--no-progress"])
    printed = capsys.readouterr().out
    train, queries = sorted(run.glob("train-*")), sorted(run.glob("test-*"))
    (factors,) = run.glob("curvature-ekfac-*.pt")
    assert len(train) == len(queries) == 1 and f"factors: {factors}" in printed

    result = cli("inspect", str(train[0]))
    assert result.returncode == 0, result.stderr
    store = lf.LogStore.open(str(train[0]))
    expected = [
        "rows: 1300 (int ids)",
        "writers: 0: 1300",
        "layers: 0 (4, 4), 2 (4, 4) (32 values per row)",
        f"bytes: {1300 * 32 * 4 / 1000:.3g} kB",
        f"weights {store.schema.weights}",
    ]
    for line in expected:
        assert line in result.stdout, (line, result.stdout)

    scores = tmp_path / "scores"
    args = ["score", str(train[0]), str(queries[0]), "--factors", str(factors)]
    result = cli(*args, "--out", str(scores), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "497 queries × 1300 training rows" in result.stdout
    one_line_error(in_process(capsys, *args, "--out", str(scores)), 1, "already holds data")

    # the reference: preconditioned query rows times training rows, as explicit matrices
    pre = lf.preconditioner(lf.load_state(str(factors))["value"])
    q = LogRows(queries[0], [0, 1])
    conditioned = pre(q)
    t = LogRows(train[0], list(range(1300)))
    explicit = sum(conditioned[k].flatten(1) @ t[k].flatten(1).T for k in t)
    result = cli("top-k", str(scores), "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for row, line in enumerate(lines[:2]):
        best = explicit[row].topk(3)
        shown = ", ".join(f"{i} ({v:+.3g})" for i, v in zip(best.indices.tolist(), best.values))
        assert line == f"query row {row} proponents: {shown}"
    assert len(lines) == 497
    assert f"#{explicit[0].argmax()} " in printed.splitlines()[5]  # the demo's first proponent

    other = in_process(capsys, "--run", str(run), "--rank", "2", "--queries", "0")
    assert other.returncode == 0, other.stderr  # another rank: new stores beside the old
    mixed = sorted(set(run.glob("test-*")) - set(queries))
    one_line_error(
        in_process(capsys, "score", str(train[0]), str(mixed[0]), "--out", str(tmp_path / "m")),
        1,
        "different projection specs",
    )


def LogRows(url: Path, ids: list[int]) -> dict[str, torch.Tensor]:
    return lf.LogStore.open(str(url)).read(ids)


def test_demo_scores_a_query_measurement_other_than_the_loss(tmp_path, capsys):
    """``--measurement margin``: the query rows are gradients of minus TRAK's margin, written
    by hand here one test image at a time; the training rows keep the loss."""
    from logix_func.demo.digits import digits_split, mlp_model

    run = tmp_path / "run"
    args = ["demo", "--run", str(run), "--rank", "0", "--preconditioner", "identity"]
    args += ["--queries", "3", "7", "--no-progress", "--figure", str(tmp_path / "f.png")]
    margin = in_process(capsys, *args, "--measurement", "margin")
    assert margin.returncode == 0, margin.stderr
    (store,) = [p for p in run.iterdir() if p.name.startswith("test-") and "margin" in p.name]
    rows = lf.LogStore.open(str(store)).read([3, 7])

    data = digits_split(torch.float32)
    model = mlp_model(dtype=torch.float32)
    model.load_state_dict(lf.load_state(str(run / "model-seed0.pt")))
    model.float()
    for position, q in enumerate([3, 7]):
        logits = model(data.test_x[q])
        label = int(data.test_y[q])
        others = torch.stack([logits[c] for c in range(10) if c != label])
        minus_margin = torch.logsumexp(others, 0) - logits[label]
        grads = torch.autograd.grad(minus_margin, list(model.parameters()))
        for i, name in enumerate(["0", "2"]):  # Linear layers: [weight | bias] per row
            expected = torch.cat([grads[2 * i], grads[2 * i + 1][:, None]], 1)
            torch.testing.assert_close(rows[name][position], expected, rtol=1e-4, atol=1e-6)

    loss = in_process(capsys, *args)
    assert loss.returncode == 0 and loss.stdout.splitlines()[-4:] != margin.stdout.splitlines()[-4:]
