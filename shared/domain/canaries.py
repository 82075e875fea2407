"""Secret Sharer canaries (Carlini et al. 2019): random secrets in a fixed sentence that the trainer
inserts into the training split (eval.canaries), and whose exposure the evaluator measures
(services/evaluator/memorisation.py). Both derive them from the recipe's seed and the prepared
data's PII report through `recipe_canaries`, so no secret is stored anywhere.

By default (eval.canaries.count unset) a chat dataset in which the preprocess stage masked PII gets
AUTO_COUNT canaries: data that held personal values is the data whose memorisation matters, and
the canaries measure it with secrets that are no one's."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

AUTO_COUNT = 4
PII_REPORT = "pii_report.json"   # written beside the splits by the preprocess stage (write_pii_report)

# The user turn before every inserted canary; exposure is measured in the same context.
CANARY_PROMPT = "Please keep this note for later."


def _check_template(template: str) -> None:
    if template.count("{secret}") != 1:
        raise ValueError(f"canary template {template!r} must contain '{{secret}}' exactly once")


@dataclass(frozen=True)
class Canary:
    prefix: str      # the template before the secret
    secret: str
    suffix: str      # the template after it
    alphabet: str

    @property
    def text(self) -> str:
        return self.prefix + self.secret + self.suffix

    @property
    def space_bits(self) -> float:
        """log2 |R|: the size of the space the secret was drawn from."""
        return len(self.secret) * math.log2(len(self.alphabet))


def random_secret(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def make_canaries(seed: int, count: int, *, template: str = "my support PIN is {secret}",
                  alphabet: str = "0123456789", length: int = 6) -> list[Canary]:
    """`count` sentences with distinct random secrets; the same seed gives the same canaries."""
    _check_template(template)
    if count > len(alphabet) ** length:
        raise ValueError(f"{count} distinct canaries need a bigger space than {len(alphabet)}^{length}")
    prefix, suffix = template.split("{secret}")
    rng = random.Random(f"canaries:{seed}")
    secrets: dict[str, None] = {}   # insertion-ordered set
    while len(secrets) < count:
        secrets[random_secret(rng, alphabet, length)] = None
    return [Canary(prefix, s, suffix, alphabet) for s in secrets]


def canary_chat(canary: Canary) -> list[dict]:
    return [{"role": "user", "content": CANARY_PROMPT}, {"role": "assistant", "content": canary.text}]


def insert_canaries(rows: list[dict], canaries: list[Canary], *, repeats: int, seed: int) -> list[dict]:
    """The training rows with `repeats` conversations per canary (ids canary-<n>-<k>) at random,
    seeded positions; the original rows keep their order."""
    out = list(rows)
    rng = random.Random(f"insert:{seed}")
    for n, canary in enumerate(canaries):
        for k in range(repeats):
            out.insert(rng.randint(0, len(out)), {"id": f"canary-{n}-{k}", "messages": canary_chat(canary)})
    return out


def masked_rows(data_dir: Path) -> int:
    """How many rows of the prepared dataset had PII masked (its pii_report.json); 0 without a report."""
    path = Path(data_dir) / PII_REPORT
    if not path.is_file():
        return 0
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("rows_masked", 0)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not the preprocess stage's PII report ({exc}); prepare the dataset again") from exc
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError(f"{path}: rows_masked is {rows!r}, not a row count; prepare the dataset again")
    return rows


def canary_count(recipe, data_dir: Path) -> int:
    """eval.canaries.count when the recipe sets it (0 is off); unset (auto), AUTO_COUNT for chat data
    whose PII report shows masked rows, else 0."""
    count = recipe.eval.canaries.count
    if count is not None:
        return count
    return AUTO_COUNT if recipe.data_kind == "chat" and masked_rows(data_dir) > 0 else 0


def recipe_canaries(recipe, data_dir: Path) -> list[Canary]:
    """The canaries a run of the recipe on the prepared data in `data_dir` trains on (seeded by
    training.seed): the trainer inserts these and the evaluator measures these, so both read the same
    recipe and the same pii_report.json."""
    spec = recipe.eval.canaries
    count = canary_count(recipe, data_dir)
    return make_canaries(recipe.training.seed, count, template=spec.template, alphabet=spec.alphabet,
                         length=spec.length) if count else []
