"""The evaluation cost estimate (services/evaluator/cost.py): its arithmetic, by hand, and the CLI."""
import json

import pytest

from ftpipe.cli import main
from shared.domain.recipe import GPU_TABLE, HardwareSpec, JudgeSpec, load_recipe

from services.evaluator.cost import SUSTAINED_BANDWIDTH_GB_S, EvalCostSpec, estimate_evaluation_cost, probe_workload
from services.evaluator.fairness import load_templates

BASE = load_recipe("tiny-sft")
# 10 new tokens an answer, on an A100 at 100 TFLOP/s (1090 GB/s) and $3.60 an hour.
RECIPE = BASE.model_copy(update={"eval": BASE.eval.model_copy(update={"max_new_tokens": 10}),
                                 "hardware": HardwareSpec(gpu="a100", sustained_tflops=100.0, price_per_gpu_hour=3.6)})
SPEC = EvalCostSpec(prompt_tokens=100, reference_tokens=50, models=3, probe_questions=4, probe_sequences=0,
                    probe_prompt_tokens=20,
                    generation_batch=4, step_overhead_s=0.01)


def test_tokens_time_and_price_of_a_memory_bound_model():
    e = estimate_evaluation_cost(RECIPE, examples=10, params=10_000_000_000, spec=SPEC)
    # 3 models x (10 examples x (100 generation prompt + 100 + 50 loglikelihood) + 4 probes x 20)
    assert e.prompt_tokens == 3 * (10 * 250 + 4 * 20) == 7740
    assert e.generated_tokens == 3 * (10 + 4) * 10 == 420
    assert e.tokens == 8160
    prompt_s = 7740 * 2 * 10e9 / 100e12                        # 1.548 s at the sustained compute
    step_s = 10e9 * 2 / 1090e9                                  # reading 20 GB of bf16 weights: 18.3 ms
    generate_s = 3 * (3 + 1) * 10 * step_s                      # ceil(10/4) + ceil(4/4) batches x 10 steps, 3 models
    assert e.seconds == pytest.approx(prompt_s + generate_s, rel=1e-3)
    assert e.usd == pytest.approx((prompt_s + generate_s) / 3600 * 3.6, rel=1e-3)
    assert e.assumptions["gpu"] == "1 x a100" and e.assumptions["params"] == 10_000_000_000
    assert e.fits_push_deadline


def test_small_models_are_step_overhead_bound_and_big_batches_compute_bound():
    small = estimate_evaluation_cost(RECIPE, examples=10, params=100_000_000, spec=SPEC)
    steps = 3 * (3 + 1) * 10
    assert small.assumptions["generation_seconds"] == pytest.approx(steps * 0.01)
    big_batch = SPEC.model_copy(update={"generation_batch": 256, "step_overhead_s": 0.0})
    e = estimate_evaluation_cost(RECIPE, examples=10, params=1_000_000_000, spec=big_batch)
    assert e.assumptions["generation_seconds"] == pytest.approx(3 * 2 * 10 * 256 * 2e9 / 100e12, rel=1e-3)


def test_a_measured_throughput_and_another_price_replace_the_defaults():
    e = estimate_evaluation_cost(RECIPE, examples=10, params=10_000_000_000, spec=SPEC, tokens_per_s=42.0,
                                 gpu_hourly_usd=7.2)
    assert e.seconds == pytest.approx(1.548 + 420 / 42.0, rel=1e-3)
    assert e.usd == pytest.approx((1.548 + 10.0) / 3600 * 7.2, rel=1e-3)
    assert "measured" in e.assumptions["generation"]


def test_the_price_table_of_the_recipe_hardware_is_the_default():
    e = estimate_evaluation_cost(BASE, examples=100, params=135_000_000)
    assert e.assumptions["price_per_gpu_hour"] == GPU_TABLE[BASE.hardware.gpu]["price_per_gpu_hour"]
    assert e.usd == pytest.approx(e.seconds / 3600 * e.assumptions["price_per_gpu_hour"], rel=1e-3)
    assert set(SUSTAINED_BANDWIDTH_GB_S) == set(GPU_TABLE)


def test_an_evaluation_longer_than_the_push_deadline_is_flagged():
    assert not estimate_evaluation_cost(RECIPE, examples=100_000, params=10_000_000_000, spec=SPEC).fits_push_deadline
    with pytest.raises(ValueError, match="examples"):
        estimate_evaluation_cost(RECIPE, examples=0, params=1)


def test_cli_estimate(capsys):
    assert main(["evaluate", "--recipe", "tiny-sft", "--estimate", "--examples", "500", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["assumptions"]["examples"] == 500 and out["assumptions"]["params"] > 0
    assert out["usd"] > 0 and out["tokens"] == out["prompt_tokens"] + out["generated_tokens"]
    assert main(["evaluate", "--recipe", "tiny-sft", "--estimate"]) == 0
    assert "4 examples x 3 models" in capsys.readouterr().out  # the recipe's eval.max_examples
    assert main(["evaluate", "--recipe", "tiny-sft"]) == 2
    assert "--data" in capsys.readouterr().err


def test_probe_workload_follows_the_recipes_suites():
    """tiny-sft: 9 adversarial + 9 alignment prompts and 4 PII probes generate; 2 x 4 extraction rows
    (teacher-forced), 4 fairness templates x every term of every axis and the control terms, and
    canaries unset (auto), counted as the 4 that data with masked PII gets, each against its 200
    candidates, are scored."""
    templates = load_templates()
    terms = sum(len(t) for t in templates.axes.values()) + len(templates.controls)
    assert probe_workload(BASE) == {"generations": 9 + 9 + 4, "sequences": 2 * 4 + 4 * 201 + 4 * terms,
                                    "judge_requests": 0}
    off = BASE.model_copy(update={"eval": BASE.eval.model_copy(update={
        "safety": BASE.eval.safety.model_copy(update={"enabled": False}),
        "canaries": BASE.eval.canaries.model_copy(update={"count": 2, "candidates": 99})})})
    assert probe_workload(off) == {"generations": 4, "sequences": 2 * 4 + 2 * 100 + 4 * terms, "judge_requests": 0}


def test_judge_requests_are_counted_per_rubric_and_model_not_priced():
    """A judge decides refusal on every adversarial answer and harmfulness on the harmful prompts'
    (tiny-sft's 9 adversarial prompts keep every category: 1 benign control)."""
    from services.evaluator.safety import BENIGN, load_adversarial_prompts, stratified_subset

    chosen = stratified_subset(load_adversarial_prompts(), lambda p: p.category, BASE.eval.safety.max_prompts)
    harmful = sum(p.category != BENIGN for p in chosen)
    assert 0 < harmful < len(chosen)

    def judged(rubrics):
        spec = JudgeSpec(base_url="http://127.0.0.1:8000/v1", model="judge", rubrics=rubrics)
        return BASE.model_copy(update={"eval": BASE.eval.model_copy(update={"judge": spec})})

    assert probe_workload(judged(("refusal",)))["judge_requests"] == len(chosen)
    assert probe_workload(judged(("refusal", "harmful", "correct")))["judge_requests"] == len(chosen) + harmful
    plain = estimate_evaluation_cost(BASE, examples=10, params=10**9)
    estimate = estimate_evaluation_cost(judged(("harmful",)), examples=10, params=10**9)
    assert estimate.assumptions["judge_requests"] == 3 * harmful and plain.assumptions["judge_requests"] == 0
    assert estimate.usd == plain.usd   # the judge's endpoint prices its own requests
