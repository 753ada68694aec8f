"""A Hugging Face Trainer under torchrun (two gloo ranks, CPU, DDP through accelerate) against
one process holding the same weights: the same store rows, influence, self-influence and top-k.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_trainer_worker import OPTIONS  # noqa: E402
from test_distributed import torchrun  # noqa: E402
from test_hf_trainer import QUERIES, TRAIN, tiny_llama, training_args  # noqa: E402

import logix_func as lf  # noqa: E402
from logix_func.integrations.huggingface import Attribution, AttributionArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_equal_one_process(tmp_path):
    run = torchrun(ROOT / "tests" / "hf_trainer_worker.py", str(tmp_path))
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = tiny_llama()
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    args = training_args(tmp_path / "single")
    single = transformers.Trainer(model=model, args=args, train_dataset=TRAIN)
    options = AttributionArguments(**{**OPTIONS, "store": str(tmp_path / "single-store")})
    reference = Attribution(single, options)
    want_store = reference.extract_log()
    want_scores = reference.influence(QUERIES)
    want_self = reference.self_influence()

    url = f"{tmp_path}/out/attribution/weights-{lf.weights_fingerprint(model)}"
    store = lf.LogStore.open(url)
    ids = store.ids()
    batches = [list(range(b * 4, b * 4 + 4)) for b in range(len(TRAIN) // 4)]
    assert ids.tolist() == sum(batches[0::2] + batches[1::2], [])  # writer 0's, then writer 1's
    assert sorted((Path(url) / "commits").iterdir()) == [
        Path(url) / "commits" / f"{r}.json" for r in range(2)
    ]
    got, want = store.read(ids), want_store.read(ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

    for rank, result in enumerate(ranks):
        assert result["world_size"] == 2 and result["wrapped"] == "DistributedDataParallel"
        assert result["url"] == url
        for name, value in model.state_dict().items():
            assert torch.equal(result["weights"][name], value), (rank, name)
        assert torch.equal(result["store_ids"], ids)
        assert torch.equal(result["train_ids"], torch.arange(len(TRAIN)))
        scale = want_scores.abs().max()
        torch.testing.assert_close(result["scores"] / scale, want_scores / scale, rtol=0, atol=1e-4)
        scale = want_self.abs().max()
        torch.testing.assert_close(result["self"] / scale, want_self / scale, rtol=0, atol=1e-4)
        best = want_scores.topk(3, dim=1)
        top = lf.TopK(*result["top"])
        assert torch.equal(top.ids, best.indices)
        torch.testing.assert_close(top.values, best.values, rtol=1e-4, atol=1e-4 * scale)
        assert "different stores" in result["url_error"]
