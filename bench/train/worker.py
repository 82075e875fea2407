"""One training process for bench/train/run.py: trains a recipe (JSON) on a prepared folder and
prints `STEP <n> <loss> <seconds since this process started>` after each step; `resume` continues
from the latest checkpoint in the work folder, as a restarted pod does."""
import time

STARTED = time.perf_counter()  # before the imports: a restarted pod pays for them too

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from shared.domain.recipe import Recipe  # noqa: E402

from services.trainer.training import local_checkpoints, train  # noqa: E402


def main() -> None:
    recipe, data, work, mode = Recipe.model_validate_json(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    done = local_checkpoints(work / "checkpoints") if mode == "resume" else []
    resume = done[-1][1] if done else None

    def show(rows: list[dict]) -> None:
        for m in rows:
            print(f"STEP {m['step']} {m['loss']} {time.perf_counter() - STARTED:.3f}", flush=True)

    train(recipe, data, work, resume_from=resume, on_metrics=show)


if __name__ == "__main__":
    main()
