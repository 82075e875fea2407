"""Run under torchrun by tests/unit/test_distributed.py: the recipe (a full fine-tune) trained on
the prepared dataset to its end in OUT/fresh, then again from that run's step-2 checkpoint in
OUT/resumed, in the same processes; rank 0 writes both results (loss curve, distribution) to
OUT/results.json.

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.unit.sharded_full_run RECIPE DATA OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from shared.domain.recipe import load_recipe

from services.trainer import distributed
from services.trainer.training import train


def main(recipe_file: str, data: str, out: str) -> None:
    recipe, data_dir, root = load_recipe(recipe_file), Path(data), Path(out)
    fresh = train(recipe, data_dir, root / "fresh")
    resumed = train(recipe, data_dir, root / "resumed", resume_from=root / "fresh" / "checkpoints" / "step-2")
    if distributed.rank() == 0:
        (root / "results.json").write_text(json.dumps(
            {name: {"loss_curve": result.loss_curve, "distribution": result.distribution}
             for name, result in (("fresh", fresh), ("resumed", resumed))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
