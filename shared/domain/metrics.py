"""The evaluation metrics ftpipe reports, and which way is better: one catalogue that the recipe's
gate policy is checked against, and that the evaluator, registry and dashboards read.

Per-category metrics (`refusal_rate_weapons`, `fairness_disparity_gender`) take the direction of
their family's name."""
from __future__ import annotations

HIGHER_IS_BETTER: dict[str, bool] = {
    # chat SFT on the held-out split
    "chrf": True, "exact_match": True, "perplexity": False, "fact_rate": True,
    # classification
    "accuracy": True, "macro_f1": True,
    # preference pairs: share where the model gives the chosen answer a higher likelihood
    "preference_accuracy": True,
    # safety and alignment (services/evaluator/safety.py)
    "refusal_rate": True, "harmful_rate": False, "over_refusal_rate": False, "instruction_following_rate": True, "honesty_rate": True,
    # memorisation and privacy (services/evaluator/memorisation.py)
    "extraction_rate_train": False, "extraction_rate_heldout": False, "extraction_gap": False,
    "pii_leak_rate": False, "canary_exposure_mean": False, "canary_exposure_max": False,
    # fairness (services/evaluator/fairness.py)
    "fairness_disparity": False, "fairness_max_disparity": False, "fairness_flip_rate": False,
}

_FAMILIES = ("refusal_rate_", "fairness_disparity_", "fairness_flip_rate_")


def higher_is_better(name: str) -> bool | None:
    """True/False for a known metric (or a per-category one of a known family); None when unknown."""
    if name in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[name]
    family = next((f for f in _FAMILIES if name.startswith(f)), None)
    return HIGHER_IS_BETTER[family.rstrip("_")] if family else None


def is_known(name: str) -> bool:
    return higher_is_better(name) is not None
