"""The interval arithmetic the gate's decisions rest on (services/evaluator/stats.py), pinned to
published values, not to our own output: Wilson intervals from Newcombe (1998a, Statistics in
Medicine 17:857-872, Table II), Newcombe's paired square-and-add interval from the worked example of
Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017, chapter 8; Cavo et
al. 2012) as the R package contingencytables reproduces it."""
import math

import pytest

from services.evaluator.stats import (
    Interval,
    minimum_detectable_effect,
    mover_difference,
    needed_more,
    newcombe_paired,
    wilson,
)


@pytest.mark.parametrize("x, n, low, high", [(81, 263, 0.2553, 0.3662), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_newcombes_table(x, n, low, high):
    got = wilson(x, n, 0.95)
    assert got == pytest.approx((low, high), abs=5e-5)


def _pairs(both: int, only_reference: int, only_candidate: int, neither: int):
    reference = [True] * both + [True] * only_reference + [False] * only_candidate + [False] * neither
    candidate = [True] * both + [False] * only_reference + [True] * only_candidate + [False] * neither
    return reference, candidate


def test_newcombe_paired_matches_the_published_example():
    # Cavo 2012: 59 both, 6 first only, 16 second only, 80 neither; the difference first - second.
    reference, candidate = _pairs(both=59, only_reference=16, only_candidate=6, neither=80)
    got = newcombe_paired(reference, candidate, 0.95)
    assert (round(got.delta, 4), round(got.low, 4), round(got.high, 4)) == (-0.0621, -0.1186, -0.0046)


def test_the_issues_case_is_not_evidence_of_a_regression():
    """instruction_following 0.000 vs base 0.200 on 5 probes: the old gate failed it on the point
    values; the interval says the sample cannot tell (it spans both a loss of 0.62 and a gain of 0.26)."""
    reference, candidate = _pairs(both=0, only_reference=1, only_candidate=0, neither=4)
    got = newcombe_paired(reference, candidate, 0.95)
    assert got.delta == pytest.approx(-0.2) and got.low < -0.5 and got.high > 0.2
    # the same 20% drop on 400 probes is decided
    reference, candidate = _pairs(both=0, only_reference=80, only_candidate=0, neither=320)
    assert newcombe_paired(reference, candidate, 0.95).high < -0.1


def test_identical_answers_give_a_narrow_interval_around_zero_and_bad_input_is_refused():
    reference, candidate = _pairs(both=0, only_reference=0, only_candidate=0, neither=200)
    got = newcombe_paired(reference, candidate, 0.95)
    assert got.delta == 0 and -0.02 < got.low <= 0 <= got.high < 0.02
    with pytest.raises(ValueError, match="same probes on both sides"):
        newcombe_paired([True], [True, False], 0.95)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson(3, 2, 0.95)


def test_mover_difference_of_two_differences():
    train, heldout = Interval(0.25, 0.10, 0.40), Interval(0.05, -0.05, 0.15)
    gap = mover_difference(train, heldout)
    assert gap.delta == pytest.approx(0.20)
    assert gap.low == pytest.approx(0.20 - math.sqrt(0.15 ** 2 + 0.10 ** 2))
    assert gap.high == pytest.approx(0.20 + math.sqrt(0.15 ** 2 + 0.10 ** 2))


def test_needed_more_and_the_minimum_detectable_effect():
    # worse by 0.2 (interval 0.2 +- 0.4 on 5 probes), tolerance 0.1: (0.4 / 0.1)^2 * 5 = 80 probes in all
    assert needed_more(Interval(0.2, -0.2, 0.6), allowed=0.1, n=5) == 75
    assert needed_more(Interval(0.1, -0.3, 0.5), allowed=0.1, n=5) is None   # on the tolerance: never
    # 2.80 sd / sqrt(n) at 95% and 80% power
    assert minimum_detectable_effect(0.5, 100, 0.95) == pytest.approx(2.8016 * 0.05, rel=1e-3)
    assert minimum_detectable_effect(0.5, 0, 0.95) == math.inf


# ------------------------------------------------------------------ intervals from the probes' details

def _safety(refused: dict[str, bool]) -> list[dict]:
    return [{"id": i, "category": "benign_control" if i.startswith("b") else "fraud", "refused": r, "answer": ""}
            for i, r in refused.items()]


def test_probe_intervals_pair_by_probe_and_refuse_different_probe_sets():
    from shared.domain.recipe import Recipe

    from services.evaluator.evidence import probe_intervals

    recipe = Recipe(name="r", version=1, base_model="tiny-random-smollm2", model_name="r")
    base = {"safety": _safety({"h1": True, "h2": True, "h3": False, "b1": False})}
    # listed in another order: pairs are matched by probe id, not position
    cand = {"safety": list(reversed(_safety({"h1": True, "h2": False, "h3": False, "b1": True})))}
    got = probe_intervals(recipe, base, cand, ["refusal_rate", "refusal_rate_fraud", "over_refusal_rate", "chrf"])
    assert set(got) == {"refusal_rate", "refusal_rate_fraud", "over_refusal_rate"}
    assert got["refusal_rate"]["delta"] == pytest.approx(-1 / 3) and got["refusal_rate"]["n"] == 3
    assert got["over_refusal_rate"]["delta"] == pytest.approx(1.0) and got["refusal_rate"]["method"] == "newcombe-paired"
    other = {"safety": _safety({"h1": True, "h9": True, "b1": False})}   # not the same probes
    assert probe_intervals(recipe, base, other, ["refusal_rate"]) == {}


def test_the_extraction_gap_combines_the_train_and_heldout_differences():
    from shared.domain.recipe import Recipe

    from services.evaluator.evidence import probe_intervals

    recipe = Recipe(name="r", version=1, base_model="tiny-random-smollm2", model_name="r")

    def rows(train: list[bool], heldout: list[bool]) -> dict:
        return {"memorisation": [{"id": str(i), "split": split, "compared": 20, "extracted": x}
                                 for split, flags in (("train", train), ("heldout", heldout))
                                 for i, x in enumerate(flags)]}
    base = rows([False] * 8, [False] * 8)
    cand = rows([True] * 4 + [False] * 4, [False] * 8)
    got = probe_intervals(recipe, base, cand, ["extraction_rate_train", "extraction_rate_heldout", "extraction_gap"])
    assert got["extraction_gap"]["method"] == "mover" and got["extraction_gap"]["delta"] == pytest.approx(0.5)
    assert got["extraction_gap"]["low"] < got["extraction_rate_train"]["low"]   # wider: two samples' noise
