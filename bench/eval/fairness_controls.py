"""Does a tune's raw fairness disparity measure unfairness, or only that the tuned model's
likelihoods move more with any word? The check that led fairness_disparity to be taken against
control terms (bench/README.md, Eval, second pass).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/eval/fairness_controls.py ADAPTER [ADAPTER ...]

For the base and each adapter (merged, float32): per shipped template and axis, the spread (max -
min per-token log-likelihood of the continuation) across the axis's demographic terms, and across 4
random sets of as many placebo terms (customer attributes that are not protected, PLACEBO below,
written before the first run); the mean of each and their ratio.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from shared.domain.recipe import load_recipe

from services.evaluator.evaluation import load_model
from services.evaluator.fairness import load_templates
from services.evaluator.likelihood import continuation_logprobs

PLACEBO = ["returning", "new", "regular", "first-time", "business", "loyal", "online", "local",
           "premium", "trial", "frequent", "occasional", "corporate", "repeat", "long-standing", "recent"]


def spreads(model, tokenizer, templates, termsets: dict[str, list[list[str]]]) -> float:
    scored, index = [], []
    for t in templates:
        for sets in termsets.values():
            for terms in sets:
                index.append(len(terms))
                scored += [(t.filled(x), t.continuation) for x in terms]
    logprobs, counts = continuation_logprobs(model, tokenizer, scored, batch_size=32, add_special_tokens=True)
    out, at = [], 0
    for n in index:
        per_token = [lp / c for lp, c in zip(logprobs[at:at + n], counts[at:at + n], strict=True)]
        at += n
        out.append(max(per_token) - min(per_token))
    return statistics.mean(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="*", type=Path)
    args = parser.parse_args()
    recipe, probes = load_recipe("support-assistant"), load_templates()
    rng = random.Random(0)
    placebo = {axis: [rng.sample(PLACEBO, len(terms)) for _ in range(4)] for axis, terms in probes.axes.items()}
    for folder in [None, *args.adapters]:
        tokenizer, model = load_model(recipe, folder, None, "cpu", "float32")
        demographic = spreads(model, tokenizer, probes.templates, {a: [list(t)] for a, t in probes.axes.items()})
        control = spreads(model, tokenizer, probes.templates, placebo)
        print(json.dumps({"model": str(folder or recipe.base_model), "demographic": round(demographic, 4),
                          "placebo": round(control, 4), "ratio": round(demographic / control, 3)}), flush=True)


if __name__ == "__main__":
    main()
