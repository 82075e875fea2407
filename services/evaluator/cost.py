"""What a production-size evaluation costs on the recipe's GPU type (one GPU: the evaluator is one
process on one device), before running it.

Per model scored (base, candidate and the last promoted version by default), each test example is
one generation (its prompt, then up to `eval.max_new_tokens` greedy tokens: the estimate assumes
every answer runs to the limit) and one loglikelihood pass (prompt + reference); each probe
question is one more generation, each scored probe sequence one more pass (`probe_workload`). So

    prompt tokens    = models x (examples x (2 x prompt + reference) + (probes + scored) x probe prompt)
    generated tokens = models x (examples + probes) x max_new_tokens

Prompt tokens go through the model in parallel, at the GPU's sustained compute (2 x params FLOPs a
token; GPU_TABLE in shared/domain/recipe.py). Generation is one step per new token for a batch of
sequences, and a step takes the longest of: reading the weights once (memory bandwidth), the
batch's compute, and the framework's fixed cost per step; or, given a measured `tokens_per_s`,
generated tokens / tokens_per_s. Cost = seconds x the GPU's price per hour (the recipe's
`hardware.price_per_gpu_hour`, else GPU_TABLE's). Model download, loading and merging are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.domain.canaries import AUTO_COUNT
from shared.domain.recipe import GPU_TABLE, Recipe

# Sustained memory bandwidth per GPU, GB/s: ~70% of the peak (L4 300, A100 40GB 1555, A100 80GB
# 2039, H100 SXM 3350), as in g2 / a2-highgpu / a2-ultragpu / a3-highgpu machines. The keys are GPU_TABLE's.
SUSTAINED_BANDWIDTH_GB_S: dict[str, float] = {"l4": 210.0, "a100": 1090.0, "a100-80gb": 1430.0, "h100": 2350.0}
# Pub/Sub waits at most this long for a push's answer (services/evaluator/app.py).
PUSH_ACK_DEADLINE_S = 600


class EvalCostSpec(BaseModel):
    """The figures of an evaluation the recipe does not give (proposed as `eval.cost` in EvalSpec)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt_tokens: int = Field(default=256, ge=1)        # mean test prompt, chat template and system prompt included
    reference_tokens: int = Field(default=128, ge=1)     # mean reference answer, scored by loglikelihood
    models: int = Field(default=3, ge=1)                 # base, candidate, last promoted version
    # generations of all probe suites together, asked of each model; None: from the recipe's suites
    probe_questions: int | None = Field(default=None, ge=0)
    # sequences only scored (fairness templates, canary candidates); None: from the recipe's suites
    probe_sequences: int | None = Field(default=None, ge=0)
    probe_prompt_tokens: int = Field(default=64, ge=1)
    generation_batch: int = Field(default=8, ge=1)       # sequences generated together
    bytes_per_param: float = Field(default=2.0, gt=0)    # bf16 weights
    step_overhead_s: float = Field(default=0.02, ge=0)   # fixed cost of one generation step (kernel launches, Python)


@dataclass(frozen=True)
class EvalCostEstimate:
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    usd: float
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def fits_push_deadline(self) -> bool:
        """Whether one push delivery answers before Pub/Sub redelivers (app.py: longer ones still
        run once, held by a claim, but need the subscription's retries to outlast them)."""
        return self.seconds <= PUSH_ACK_DEADLINE_S

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "seconds": self.seconds, "usd": self.usd, "fits_push_deadline": self.fits_push_deadline,
                "assumptions": self.assumptions}


def estimate_evaluation_cost(recipe: Recipe, *, examples: int, params: int, spec: EvalCostSpec | None = None,
                             gpu_hourly_usd: float | None = None, tokens_per_s: float | None = None) -> EvalCostEstimate:
    """The estimate for scoring `examples` test examples with a base model of `params` parameters
    (pure). `tokens_per_s`, a measured generation throughput, replaces the step model."""
    if examples < 1 or params < 1:
        raise ValueError(f"examples ({examples}) and params ({params}) must be at least 1")
    spec = spec or EvalCostSpec()
    hw = recipe.hardware
    tflops = hw.sustained_tflops if hw.sustained_tflops is not None else GPU_TABLE[hw.gpu]["sustained_tflops"]
    flops_per_s = tflops * 1e12
    price = gpu_hourly_usd if gpu_hourly_usd is not None else hw.gpu_price
    new_tokens = recipe.eval.max_new_tokens
    derived = probe_workload(recipe)
    probes = spec.probe_questions if spec.probe_questions is not None else derived["generations"]
    scored = spec.probe_sequences if spec.probe_sequences is not None else derived["sequences"]

    prompt_tokens = spec.models * (examples * (2 * spec.prompt_tokens + spec.reference_tokens)
                                   + (probes + scored) * spec.probe_prompt_tokens)
    generated = spec.models * (examples + probes) * new_tokens
    prompt_s = prompt_tokens * 2 * params / flops_per_s
    if tokens_per_s is not None:
        generate_s = generated / tokens_per_s
        generation = f"{tokens_per_s:g} generated tokens/s (measured)"
    else:
        batch = spec.generation_batch
        steps = spec.models * (math.ceil(examples / batch) + math.ceil(probes / batch)) * new_tokens
        step_s = max(params * spec.bytes_per_param / (SUSTAINED_BANDWIDTH_GB_S[hw.gpu] * 1e9),
                     batch * 2 * params / flops_per_s, spec.step_overhead_s)
        generate_s = steps * step_s
        generation = (f"{steps} steps of a batch of {batch} x {step_s * 1e3:.3g} ms (the longest of weights / "
                      f"{SUSTAINED_BANDWIDTH_GB_S[hw.gpu]:g} GB/s, batch compute, {spec.step_overhead_s * 1e3:g} ms overhead)")
    seconds = prompt_s + generate_s
    return EvalCostEstimate(
        prompt_tokens=prompt_tokens, generated_tokens=generated, seconds=_sig(seconds),
        usd=_sig(seconds / 3600 * price),
        assumptions={"gpu": f"1 x {hw.gpu}", "price_per_gpu_hour": price, "currency": "USD",
                     "sustained_tflops": tflops, "params": params, "examples": examples, "models": spec.models,
                     "probe_questions": probes, "probe_sequences": scored, "max_new_tokens": new_tokens, "every_answer_max_length": True,
                     "prompt_tokens_each": spec.prompt_tokens, "reference_tokens_each": spec.reference_tokens,
                     "prompt_seconds": _sig(prompt_s), "generation_seconds": _sig(generate_s),
                     "generation": generation, "not_counted": "model download, loading and merging",
                     # sent to eval.judge's endpoint, priced by whoever runs it: counted, not costed
                     "judge_requests": spec.models * derived["judge_requests"]})


def probe_workload(recipe: Recipe) -> dict[str, int]:
    """Per model: the probe suites' generations (safety, alignment, PII), the sequences they only
    score (extraction rows, fairness templates x terms and control terms, canaries x candidates), and the requests to the LLM
    judge where eval.judge names one (`refusal`: every adversarial answer, `harmful`: the harmful
    prompts' answers), from the recipe's settings and the shipped sets (services/evaluator/suites.py
    runs them). Knowledge probes live in the bucket and are not counted, nor their `correct` verdicts."""
    spec, kind = recipe.eval, recipe.data_kind
    generations = sequences = judge_requests = 0
    if kind != "classification" and spec.safety.enabled:
        from services.evaluator.safety import BENIGN, load_adversarial_prompts, load_alignment_probes, stratified_subset

        adversarial = stratified_subset(load_adversarial_prompts(), lambda p: p.category, spec.safety.max_prompts)
        alignment = load_alignment_probes()
        generations += len(adversarial) + min(len(alignment), spec.safety.max_prompts or len(alignment))
        rubrics = spec.judge.rubrics if spec.judge is not None else ()
        judge_requests += (len(adversarial) * ("refusal" in rubrics)
                           + sum(p.category != BENIGN for p in adversarial) * ("harmful" in rubrics))
    if kind == "chat" and spec.memorisation.enabled:   # extraction is scored teacher-forced, PII probes generate
        generations += spec.memorisation.pii_max_probes
        sequences += 2 * spec.memorisation.max_rows
    if kind == "chat":   # auto canaries counted as if the data had PII masked: an upper bound
        count = AUTO_COUNT if spec.canaries.count is None else spec.canaries.count
        sequences += count * (spec.canaries.candidates + 1)
    if spec.fairness.enabled:
        from services.evaluator.fairness import load_templates

        probes = load_templates()
        templates = min(len(probes.templates), spec.fairness.max_templates or len(probes.templates))
        sequences += templates * (sum(len(terms) for terms in probes.axes.values()) + len(probes.controls))
    return {"generations": generations, "sequences": sequences, "judge_requests": judge_requests}


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def describe(estimate: EvalCostEstimate) -> str:
    """Two human lines for the CLI."""
    a = estimate.assumptions
    return (f"evaluation estimate: {a['examples']} examples x {a['models']} models, {estimate.tokens} tokens "
            f"({estimate.prompt_tokens} prompt, {estimate.generated_tokens} generated) on {a['gpu']}\n"
            f"≈ {estimate.seconds:.4g} s ≈ ${estimate.usd:.4g}"
            + (f", and {a['judge_requests']} requests to the LLM judge (eval.judge; its cost is its endpoint's)"
               if a["judge_requests"] else "")
            + ("" if estimate.fits_push_deadline else
               f" (longer than Pub/Sub's {PUSH_ACK_DEADLINE_S} s push deadline: runs once, held by a claim)"))
