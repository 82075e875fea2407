"""Secret Sharer canaries (Carlini et al. 2019): random secrets in a fixed sentence that the trainer
inserts into the training split when the recipe asks (eval.canaries), and whose exposure the
evaluator measures (services/evaluator/memorisation.py). Both derive them from the recipe's seed,
so no secret is stored anywhere."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

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


def recipe_canaries(recipe) -> list[Canary]:
    """The canaries a recipe's run trains on (eval.canaries, seeded by training.seed); none when off."""
    spec = recipe.eval.canaries
    return make_canaries(recipe.training.seed, spec.count, template=spec.template, alphabet=spec.alphabet,
                         length=spec.length) if spec.count else []
