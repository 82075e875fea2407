"""Recipes: versioned job templates (YAML in `recipes/`), resolved into the JobSpec that travels
inside every message so that each service stays stateless."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says what, where, and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DataFormat = Literal["auto", "chat", "sharegpt", "instruction", "prompt_completion", "preference", "classification"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)


class DataSpec(_Strict):
    # Input row shape (services/preprocess/formats.py): auto-detected per row, or one named shape only.
    format: DataFormat = "auto"
    # Renames of input fields / columns to the canonical names, e.g. {text: review, label: stars}.
    columns: dict[str, str] = {}
    # A field / column that fixes a row's split (train | val | test); null ignores it.
    split_column: str | None = "split"
    # Classification: the allowed labels (others are rejected rows); None accepts any label.
    labels: tuple[str | int, ...] | None = None
    # Classification: split each label 80/10/10 on its own (exact proportions per label).
    stratify: bool = True
    system_prompt: str | None = None
    max_rejected_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    max_row_bytes: int = Field(default=64_000, gt=0)
    max_file_bytes: int = Field(default=50 * 2**30, gt=0)   # a drop over this is rejected before Spark reads it
    # PII (services/preprocess/pii.py): the detector backend, the categories masked, and the share of
    # documents the independent residual scan may still flag after masking before the dataset is rejected.
    pii_backend: Literal["rules", "dlp", "presidio"] = "rules"
    pii_categories: tuple[Literal["email", "phone", "card", "iban", "ip", "ssn", "tfn", "abn", "medicare", "dob",
                                  "address", "person"], ...] = (
        "email", "phone", "card", "iban", "ip", "ssn", "tfn", "abn", "medicare", "dob", "address", "person")
    pii_residual_threshold: float = Field(default=0.001, ge=0.0, le=1.0)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_rows: int = Field(default=10, ge=1)
    # Privacy: a prepared dataset waits for `ftpipe privacy approve` before training starts.
    privacy_review: bool = False
    # A drop must carry a legal basis / consent reference (`ftpipe drop --legal-basis`), else rejected.
    require_legal_basis: bool = False

    @model_validator(mode="after")
    def _split_sums_to_one(self) -> "DataSpec":
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError(f"data.split must be three non-negative fractions summing to 1, got {list(self.split)}")
        return self


class DedupSpec(_Strict):
    """Near-duplicate removal (after exact dedup): MinHash over word shingles, LSH banding.

    Defaults chosen on the bench corpus (bench/preprocess: 200k short support chats, near copies
    with 1-3 word edits; figures in services/preprocess/neardup.py and bench/README.md): 2-word
    shingles at 16 x 7 bands/rows give F1 0.9995; 3-word shingles at 14 x 8 gave 0.9878, 5-word 0.89.
    """

    near: bool = True
    shingle_words: int = Field(default=2, ge=1, le=16)
    num_perm: int = Field(default=112, ge=2, le=1024)
    bands: int = Field(default=16, ge=1)
    rows: int = Field(default=7, ge=1)
    threshold: float = Field(default=0.7, gt=0.0, le=1.0)
    max_iterations: int = Field(default=50, ge=1)  # connected components: label propagation rounds at most

    @model_validator(mode="after")
    def _bands_rows(self) -> "DedupSpec":
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"dedup.bands * dedup.rows must equal dedup.num_perm, got "
                             f"{self.bands} * {self.rows} != {self.num_perm}")
        return self


QUALITY_RULES = ("empty_answer", "short_answer", "long_answer", "truncated_answer", "symbol_ratio",
                 "digit_ratio", "duplicate_lines", "repeated_ngrams", "boilerplate", "non_printable",
                 "language", "toxicity")


class QualitySpec(_Strict):
    """Heuristic quality filters (Gopher / C4 / FineWeb style, adapted to chat rows); see
    services/preprocess/quality.py. A row removed by any enabled rule goes to filtered.jsonl."""

    enabled: bool = True
    rules: tuple[str, ...] = tuple(r for r in QUALITY_RULES if r != "toxicity")
    min_answer_words: int = Field(default=1, ge=0)          # support answers can be one word ("Bonjour")
    max_answer_words: int = Field(default=4000, ge=1)
    truncated_min_words: int = Field(default=30, ge=1)      # only long answers count as cut off mid-sentence
    max_symbol_ratio: float = Field(default=0.1, ge=0.0)    # '#', '...', '…' per word (Gopher)
    max_digit_ratio: float = Field(default=0.6, ge=0.0, le=1.0)       # digits / non-space characters
    max_duplicate_line_fraction: float = Field(default=0.3, ge=0.0, le=1.0)  # Gopher
    repeated_ngram_n: int = Field(default=2, ge=1, le=10)
    max_top_ngram_fraction: float = Field(default=0.2, ge=0.0, le=1.0)       # Gopher: 0.20 for 2-grams
    ngram_min_words: int = Field(default=20, ge=1)          # n-gram repetition only judged on longer texts
    max_non_printable_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    languages: tuple[str, ...] = ("en",)
    min_language_confidence: float = Field(default=0.8, ge=0.0, le=1.0)
    language_min_words: int = Field(default=6, ge=1)        # shorter texts are not language-checked
    max_toxicity: float = Field(default=0.05, ge=0.0, le=1.0)  # lexicon hits per word

    @model_validator(mode="after")
    def _known_rules(self) -> "QualitySpec":
        unknown = sorted(set(self.rules) - set(QUALITY_RULES))
        if unknown:
            raise ValueError(f"quality.rules: unknown rule(s) {unknown}; known: {list(QUALITY_RULES)}")
        return self


# Defaults for the cost estimate (services/preprocess/cost.py): sustained = ~40% of the dense
# BF16 peak (L4 121, A100 312, H100 SXM 989 TFLOP/s); prices are approximate on-demand USD per
# GPU-hour on Google Cloud (g2 / a2 / a2-ultra / a3 machines, VM share included). Override in the
# recipe. memory_gib: the GPU's memory as nvidia-smi reports it (23034, 40960, 81920, 81559 MiB),
# which the memory planner (shared/domain/memory_plan.py) plans against.
GPU_TABLE: dict[str, dict[str, float]] = {
    "l4": {"sustained_tflops": 48.0, "price_per_gpu_hour": 0.85, "memory_gib": 22.49},
    "a100": {"sustained_tflops": 125.0, "price_per_gpu_hour": 3.70, "memory_gib": 40.0},
    "a100-80gb": {"sustained_tflops": 125.0, "price_per_gpu_hour": 5.07, "memory_gib": 80.0},
    "h100": {"sustained_tflops": 400.0, "price_per_gpu_hour": 11.00, "memory_gib": 79.65},
}


# GKE's accelerator label values (node selector `cloud.google.com/gke-accelerator`).
GKE_ACCELERATORS = {"l4": "nvidia-l4", "a100": "nvidia-tesla-a100", "a100-80gb": "nvidia-a100-80gb",
                    "h100": "nvidia-h100-80gb"}


class HardwareSpec(_Strict):
    """Where training runs: the cost estimate (services/preprocess/cost.py) and the GKE Job the
    trainer renders (services/trainer/k8s.py)."""
    gpu: Literal["l4", "a100", "a100-80gb", "h100"] = "l4"     # a100: the 40 GB one
    count: int = Field(default=1, ge=1)                              # GPUs per node
    nodes: int = Field(default=1, ge=1)                              # > 1: a JobSet of `nodes` pods
    spot: bool = True                                        # spot VMs: preemptible, ~60-70% cheaper
    node_pool: str | None = None                             # default: ftpipe-<gpu>[-spot]
    price_per_gpu_hour: float | None = Field(default=None, ge=0.0)   # default: GPU_TABLE
    sustained_tflops: float | None = Field(default=None, gt=0.0)     # per GPU; default: GPU_TABLE

    @property
    def total_gpus(self) -> int:
        return self.count * self.nodes

    @property
    def gpu_price(self) -> float:
        """USD per GPU-hour: the recipe's, else the GPU table's."""
        return self.price_per_gpu_hour if self.price_per_gpu_hour is not None else GPU_TABLE[self.gpu]["price_per_gpu_hour"]

    @property
    def pool(self) -> str:
        return self.node_pool or f"ftpipe-{self.gpu}{'-spot' if self.spot else ''}"


DistributionStrategy = Literal["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
DISTRIBUTION_STRATEGIES: tuple[str, ...] = get_args(DistributionStrategy)


class DistributionSpec(_Strict):
    """How training spreads over hardware.count x hardware.nodes processes (torchrun)."""
    strategy: DistributionStrategy = "single"


Priority = Literal["batch", "interactive", "production"]  # lowest first
PRIORITIES: tuple[str, ...] = get_args(Priority)


class SchedulingSpec(_Strict):
    """Scheduling of the training job: its priority class and, on GKE, the Kueue queue it waits in."""
    priority: Priority = "batch"
    queue: str = Field(default="ftpipe", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


AdapterKind = Literal["lora", "qlora", "prefix", "full"]
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)


class AdapterSpec(_Strict):
    """What trains (services/trainer/modeling.py): LoRA on a frozen base (held in training.precision);
    QLoRA, LoRA on a 4-bit (NF4) base through bitsandbytes; prefix tuning (trained key/value prefixes
    in every layer); full, every weight of the base (the result is a whole model, not an adapter)."""
    kind: AdapterKind = "lora"
    r: int = Field(default=16, ge=1)                         # LoRA / QLoRA rank
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: str | tuple[str, ...] = "all-linear"
    quant_type: Literal["nf4", "fp4"] = "nf4"        # QLoRA: the 4-bit data type of the frozen base
    double_quant: bool = True                        # QLoRA: quantise the quantisation constants too
    num_virtual_tokens: int = Field(default=16, ge=1)        # prefix tuning: trained positions per layer


class TrainingSpec(_Strict):
    epochs: float = Field(default=3.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)   # gradients are clipped to this global norm each step
    group_by_length: bool = True              # batch similar lengths together: less padding, same randomness per epoch
    # SFT: several conversations per row of max_seq_len tokens, each attending only to itself (no padding).
    packing: bool = False
    # DPO: strength of the pull towards the base model (TRL's beta); ORPO: weight of the odds-ratio term (lambda).
    beta: float = Field(default=0.1, gt=0)
    max_seq_len: int = Field(default=256, ge=16)
    checkpoint_every: int = Field(default=20, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)    # the latest ones; the best (lowest val loss) is kept as well
    metrics_every: int = Field(default=5, ge=1)
    # Validation loss every this many steps (default: at each checkpoint), and early stop when it
    # rises this many evaluations in a row (0: never); see services/trainer/monitor.py.
    eval_every: int | None = Field(default=None, ge=1)
    early_stop_evals: int = Field(default=3, ge=0)
    # NEFTune (Jain et al. 2023, arXiv:2310.05914): uniform noise of scale alpha / sqrt(L * d) on the
    # input embeddings in training forwards only (L the batch's padded or packed row length, d the
    # embedding width); validation, probes and the saved model see none. None: off.
    neftune_alpha: float | None = Field(default=None, gt=0)
    # What picks the run's result among its validations. val_loss: the lowest validation loss (the
    # result is the last step unless it rose early_stop_evals times in a row). probes: the highest
    # fact rate on eval.probes' "val" probes, asked at each validation (ties: the lower val loss);
    # the result is that checkpoint, and the run stops after early_stop_evals validations without a
    # better rate, or at a rate of 1: epochs are a cap.
    select_by: Literal["val_loss", "probes"] = "val_loss"
    grad_norm_alert: float = Field(default=10.0, gt=0)   # a pre-clipping gradient norm above this raises an alert
    seed: int = 0
    # What the frozen base computes in: auto is bf16 on a GPU that has it (fp16 with a loss scaler on
    # one that has not) and fp32 on a CPU. Trainable weights and optimizer state stay fp32.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Activation checkpointing: each layer's activations are recomputed in the backward pass instead
    # of kept (much less memory, about a third more compute). None: on on a GPU, off on a CPU. It
    # changes memory and speed, not the numbers.
    gradient_checkpointing: bool | None = None


class BudgetSpec(_Strict):
    """What a run may cost (USD, at the recipe's hardware prices): the trainer stops a run whose
    projected cost passes max_cost x overrun."""
    max_cost: float | None = Field(default=None, ge=0.0)
    overrun: float = Field(default=1.2, ge=1.0)


class GateRule(_Strict):
    """The gate on one metric. The candidate fails the rule when it is worse than a compared model
    (the base; the last promoted version too when `against` names it) by more than `tolerance`, or
    outside [min, max]. Which way is worse comes from shared/domain/metrics.py."""
    tolerance: float | None = Field(default=None, ge=0.0)   # None: no comparison, bounds only
    relative: bool = False   # tolerance as a fraction of the compared model's score (0.02 = 2%)
    min: float | None = None
    max: float | None = None
    action: Literal["block", "warn", "off"] = "block"   # off: drop a default rule
    against: tuple[Literal["base", "production"], ...] = ("base",)

    @model_validator(mode="after")
    def _says_something(self) -> "GateRule":
        if self.action != "off" and self.tolerance is None and self.min is None and self.max is None:
            raise ValueError("a gate rule needs a tolerance (against the base), a min or a max")
        return self


class SafetySpec(_Strict):
    """Adversarial prompts (refusal rate) and alignment probes (instruction following, honesty),
    shipped with ftpipe: services/evaluator/data/."""
    enabled: bool = True
    # A stratified subset of this many prompts per set (every category kept); None asks all of them.
    max_prompts: int | None = Field(default=None, ge=9)
    max_new_tokens: int = Field(default=48, ge=1)


class MemorisationSpec(_Strict):
    """Verbatim extraction of training replies against held-out ones, and PII leakage around the
    masked spans of the training data (chat)."""
    enabled: bool = True
    max_rows: int = Field(default=200, ge=1)          # rows per split for extraction
    prefix_tokens: int = Field(default=32, ge=0)
    # A row is extracted when greedy decoding writes the reply's next match_tokens tokens exactly
    # (checked in one teacher-forced pass: services/evaluator/likelihood.teacher_forced).
    match_tokens: int = Field(default=20, ge=1)
    pii_max_probes: int = Field(default=200, ge=1)
    pii_new_tokens: int = Field(default=16, ge=1)
    # Where PII-leak probes come from (services/evaluator/memorisation.pii_leakage): masked replies,
    # read-backs after masked user turns, and the shipped elicitation prompts (any chat data).
    pii_sources: tuple[Literal["assistant", "user", "elicitation"], ...] = Field(
        default=("assistant", "user", "elicitation"), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_suffix_tokens(cls, data):
        if isinstance(data, dict) and "suffix_tokens" in data:
            raise ValueError("eval.memorisation.suffix_tokens is gone: extraction compares match_tokens tokens and "
                             "generates nothing beyond them; remove suffix_tokens (set match_tokens instead)")
        return data


class CanarySpec(_Strict):
    """Secret Sharer canaries (chat): `count` random secrets, each inserted `repeats` times into the
    training split by the trainer, derived from training.seed; the evaluator measures their exposure.
    Unset (auto): 4 where the prepared chat data had PII masked, else none
    (shared/domain/canaries.canary_count); 0 turns canaries off."""
    count: int | None = Field(default=None, ge=0)
    # Once, as a real customer's value appears. On the demo recipe (3 epochs at lr 2e-3) canaries seen
    # once reached 6.5-9.7 bits on the demo's model (4 canaries; 5.0 at most in an earlier
    # measurement; never-inserted ones 0.7-6.2), one seen 5 times 19.9 of 19.9: the demo's tune sits
    # close to the default 10-bit ceiling, which is the gate saying it memorises.
    repeats: int = Field(default=1, ge=1)
    template: str = "my support PIN is {secret}"
    alphabet: str = Field(default="0123456789", min_length=2)
    length: int = Field(default=6, ge=1)
    # Random secrets each canary is ranked against. The rank comes from a skew-normal fitted to their
    # log-perplexities (services/evaluator/memorisation.py), which a few hundred samples fit: 200 was
    # what the default-on canaries were measured with on the demo, and each costs a scored sequence
    # per canary and side (1,000 made canaries the slowest suite of the demo's evaluation).
    candidates: int = Field(default=200, ge=10)

    @model_validator(mode="after")
    def _one_slot(self) -> "CanarySpec":
        if self.template.count("{secret}") != 1:
            raise ValueError(f"eval.canaries.template {self.template!r} must contain '{{secret}}' exactly once")
        return self


class FairnessSpec(_Strict):
    """Counterfactual templates with demographic terms swapped (services/evaluator/data/)."""
    enabled: bool = True
    max_templates: int | None = Field(default=None, ge=1)


class JudgeSpec(_Strict):
    """An LLM judge behind an OpenAI-compatible endpoint (vLLM, Vertex AI, `ftpipe serve`) that decides
    refusal, harmfulness and answer correctness where a rule cannot judge (services/evaluator/judge.py,
    docs/evaluation-judges.md). The regexes always run too; the report gives their agreement. The
    endpoint must be allowed by the deployment (FTPIPE_JUDGE_URLS; loopback outside the cloud)."""
    base_url: str                                  # e.g. http://127.0.0.1:8000/v1
    model: str = Field(min_length=1)
    # The NAME of an environment variable of the evaluator that holds the key, never the key itself.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    concurrency: int = Field(default=4, ge=1, le=64)
    # true: a judge that cannot decide errors the evaluation (unevaluated, re-evaluable); false: the
    # suite is decided by the regexes on every side, with a note in the report.
    required: bool = False
    rubrics: tuple[Literal["refusal", "harmful", "correct"], ...] = ("refusal", "harmful", "correct")

    @field_validator("base_url")
    @classmethod
    def _plain_http_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"eval.judge.base_url {url!r} must be an http(s) URL with a host, e.g. "
                             "https://judge.example.com/v1")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"eval.judge.base_url {url!r} must not carry credentials, a query or a fragment; "
                             "name the key's environment variable in eval.judge.api_key_env")
        return url

    @field_validator("rubrics")
    @classmethod
    def _some_rubrics(cls, rubrics: tuple[str, ...]) -> tuple[str, ...]:
        if not rubrics or len(set(rubrics)) != len(rubrics):
            raise ValueError("eval.judge.rubrics must name at least one of refusal, harmful, correct, each once")
        return rubrics


class EvalSpec(_Strict):
    max_examples: int = Field(default=40, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    # Paired bootstrap over test examples for every metric's delta; 0 turns intervals off.
    bootstrap_iters: int = Field(default=1000, ge=0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    # A block rule whose interval straddles its tolerance (services/evaluator/gate.py): `warn` reports
    # it and lets the gate pass; `hold` registers the version `held` (neither promoted nor quarantined,
    # re-evaluable); `evaluate_more` scores the next slice of each undecided suite's probe set (the
    # first slice is the suite's limit: safety.max_prompts, memorisation.max_rows / pii_max_probes,
    # fairness.max_templates), up to `more_rounds` times, then holds what is still undecided. Its
    # intervals are at confidence 1 - (1 - confidence) / (1 + more_rounds) at every look (Bonferroni),
    # so looking again does not raise the error rate. `hold` by default: the default probe sets are
    # sized to their tolerances (docs/evaluation-statistics.md, "MDE at defaults").
    on_inconclusive: Literal["warn", "hold", "evaluate_more"] = "hold"
    more_rounds: int = Field(default=2, ge=1, le=10)
    # What every side is scored in (weights and activations; log-probabilities are taken in float32).
    # `auto`: bfloat16 where the device multiplies it natively (a CUDA GPU with bf16; a CPU with AMX
    # or AVX512-BF16, where generation runs 2.2x as fast as in float32 on SmolLM2-135M: bench/eval),
    # else float32. Every side of one evaluation in the same dtype, so the comparisons stay paired.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Score the model name's current production version too (when there is one).
    compare_production: bool = True
    # Optional knowledge probes (JSONL: {"question": ..., "expect": [...]}) named relative to the bucket.
    probes: str | None = None
    # Standard lm-eval tasks, run when their data is in the local datasets cache (offline);
    # include_path adds a folder of task YAMLs of your own.
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include_path: str | None = None
    safety: SafetySpec = SafetySpec()
    memorisation: MemorisationSpec = MemorisationSpec()
    canaries: CanarySpec = CanarySpec()
    fairness: FairnessSpec = FairnessSpec()
    judge: JudgeSpec | None = None   # None: the regexes and substring checks decide
    # Gate policy: metric -> rule, over the defaults for the recipe's task and enabled probes
    # (shared/domain/gate_rules.py: default_rules); a rule here replaces the default one of its metric.
    gate: dict[str, GateRule] = {}

    @model_validator(mode="before")
    @classmethod
    def _old_gate_keys(cls, data):
        if isinstance(data, dict) and ({"gate_metrics", "tolerance"} & set(data)):
            raise ValueError("eval.gate_metrics and eval.tolerance were replaced by eval.gate, a rule per metric, "
                             "e.g. gate: {chrf: {tolerance: 0.02, relative: true}, perplexity: {tolerance: 0.1, "
                             "relative: true, action: warn}}")
        return data

    @model_validator(mode="after")
    def _gate_metrics_known(self) -> "EvalSpec":
        from shared.domain.metrics import HIGHER_IS_BETTER, is_known

        for name in self.gate:
            # task:metric names come from standard lm-eval tasks, whose direction lm-eval reports
            if not is_known(name) and ":" not in name:
                raise ValueError(f"eval.gate: unknown metric {name!r}; known: {sorted(HIGHER_IS_BETTER)} "
                                 "(plus refusal_rate_<category>, fairness_disparity_<axis>, <lm-eval task>:<metric>)")
        return self


class RegistrySpec(_Strict):
    """What the registry does with a version that passed the gate (services/registry_fn/): promote it
    to production at once, or, with `approval`, register it as a `candidate` (the `staging` alias moves
    to it) that waits until someone approves it (`ftpipe models approve`, the dashboard, or the
    registry's authenticated approval function) and only then goes to production."""
    approval: bool = False


class Recipe(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    version: int = Field(ge=1)
    description: str = ""
    task: Literal["chat_sft", "classification"] = "chat_sft"
    method: Literal["sft", "dpo", "orpo"] = "sft"
    base_model: str
    model_name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    data: DataSpec = DataSpec()
    dedup: DedupSpec = DedupSpec()
    quality: QualitySpec = QualitySpec()
    adapter: AdapterSpec = AdapterSpec()
    training: TrainingSpec = TrainingSpec()
    eval: EvalSpec = EvalSpec()
    hardware: HardwareSpec = HardwareSpec()
    budget: BudgetSpec = BudgetSpec()
    distribution: DistributionSpec = DistributionSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    registry: RegistrySpec = RegistrySpec()

    @property
    def hash(self) -> str:
        return recipe_hash(self)

    @property
    def data_kind(self) -> str:
        """The kind of rows this recipe trains on: chat, preference (DPO / ORPO) or classification."""
        if self.method in ("dpo", "orpo"):
            return "preference"
        return "classification" if self.task == "classification" else "chat"

    @model_validator(mode="after")
    def _method_fits_task_and_format(self) -> "Recipe":
        if self.task == "classification" and self.method != "sft":
            raise ValueError(f"method {self.method!r} does not apply to task 'classification'; use method 'sft'")
        wanted = {"chat": ("chat", "sharegpt", "instruction", "prompt_completion"),
                  "preference": ("preference",), "classification": ("classification",)}[self.data_kind]
        if self.data.format not in ("auto", *wanted):
            raise ValueError(f"data.format {self.data.format!r} does not fit task {self.task!r} with method "
                             f"{self.method!r}, which train on {self.data_kind} rows; use auto or one of {list(wanted)}")
        if self.training.packing and self.data_kind != "chat":
            raise ValueError(f"training.packing applies to chat SFT; this recipe trains {self.data_kind} rows "
                             f"(task {self.task!r}, method {self.method!r}); set packing: false")
        if self.eval.canaries.count and self.data_kind != "chat":
            raise ValueError(f"eval.canaries apply to chat SFT (the trainer inserts them as conversations); this "
                             f"recipe trains {self.data_kind} rows: set eval.canaries.count: 0")
        if self.training.packing and self.adapter.kind == "prefix":
            # the virtual tokens are a cache every conversation of a packed row attends through, and
            # transformers only separates packed conversations when there is no cache
            raise ValueError("training.packing does not combine with adapter.kind 'prefix'; set packing: false, "
                             "or use lora")
        if self.training.select_by == "probes" and not (self.eval.probes and self.data_kind == "chat"):
            raise ValueError("training.select_by 'probes' picks checkpoints on eval.probes' val probes: it needs a "
                             "chat recipe with eval.probes set; or use select_by: val_loss")
        if self.adapter.kind == "prefix" and self.task == "classification":
            raise ValueError("adapter.kind 'prefix' is for causal LMs; use lora, qlora or full for classification")
        gpus = self.hardware.total_gpus
        if self.distribution.strategy == "single" and gpus > 1:
            raise ValueError(f"hardware asks for {gpus} GPUs ({self.hardware.count} x {self.hardware.nodes} nodes) "
                             "with distribution.strategy 'single'; pick ddp, fsdp, deepspeed_zero2 or deepspeed_zero3")
        known = {"messages", "conversations", "instruction", "input", "output", "response", "prompt",
                 "completion", "chosen", "rejected", "text", "label"}
        if unknown := sorted(set(self.data.columns) - known):
            raise ValueError(f"data.columns: unknown canonical field(s) {unknown}; known: {sorted(known)}")
        return self


def recipe_hash(recipe: Recipe) -> str:
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_recipe(text: str, *, source: str = "<recipe>") -> Recipe:
    """Parse YAML text into a Recipe. safe_load refuses python tags; errors name the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise RecipeError(f"{source}: invalid recipe: {problems}") from exc


def load_recipe(name_or_path: str, *, overrides: dict | None = None) -> Recipe:
    """A recipe by name (from `recipes/`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_recipes()) or "none"
        raise RecipeError(f"recipe {name_or_path!r} not found (looked for {path}); known recipes: {known}")
    recipe = parse_recipe(path.read_text(), source=str(path))
    if overrides:
        recipe = apply_overrides(recipe, overrides)
    return recipe


def apply_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """Dotted-key overrides, e.g. {"training.epochs": 1}."""
    data = recipe.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise RecipeError(f"override {dotted!r}: {key!r} is not a section of the recipe")
            node = node[key]
        if leaf not in node:
            raise RecipeError(f"override {dotted!r}: unknown field {leaf!r}")
        node[leaf] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"invalid override: {exc.errors()[0]['msg']}") from exc


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
