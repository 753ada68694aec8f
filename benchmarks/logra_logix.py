"""LogIX's hook-based LoGra on the benchmark's models; run with the peers' virtualenv python.

``python benchmarks/logra_logix.py mlp|transformer REPEATS`` prints one JSON line: the best
time of a plain forward+backward and of LogIX's logged forward+backward (LoRA rank 64 on every
nn.Linear, per-sample gradients logged in memory, not saved), and the peak extra memory of each.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import logix  # noqa: E402
import torch  # noqa: E402
from logra_models import RANK, best_times, build, peak_extra_mib, summed_ce  # noqa: E402


def main() -> None:
    name, repeats = sys.argv[1], int(sys.argv[2])
    model, (x, y) = build(name)
    plain_model, _ = build(name)

    def plain():
        plain_model.zero_grad(set_to_none=True)
        summed_ce(plain_model(x), y).backward()

    with tempfile.TemporaryDirectory() as root:
        config = os.path.join(root, "config.yaml")
        with open(config, "w") as f:
            f.write(f"root_dir: {root}\nlora:\n  rank: {RANK}\n")
        run = logix.LogIX(project="bench", config=config)
        run.watch(model, type_filter=[torch.nn.Linear])
        run.add_lora()
        run.setup({"grad": ["log"]})
        ids = list(range(len(x)))

        def logged():
            with run(data_id=ids):
                model.zero_grad(set_to_none=True)
                summed_ce(model(x), y).backward()
            _, log = run.get_log()
            return log

        def release():
            plain_model.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            run.binfo.clear()

        log = logged()
        shapes = {k: tuple(v["grad"].shape) for k, v in log.items()}
        times = best_times({"plain": plain, "logix": logged}, repeats)
        result = {
            "plain_s": times["plain"],
            "logix_s": times["logix"],
            "plain_peak_mib": peak_extra_mib(plain, release),
            "logix_peak_mib": peak_extra_mib(logged, release),
            "projected_floats_per_sample": sum(s[1] * s[2] for s in shapes.values()),
            "layers": len(shapes),
            "torch": torch.__version__,
            "logix": logix.__version__,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
