"""Knowledge probes: the file format, scoring and batched greedy generation live in
shared/domain/probes.py, shared with the trainer (which picks checkpoints on the val probes,
`training.select_by: probes`); the evaluator gates on the test probes. Where the recipe names an LLM
judge (eval.judge with the `correct` rubric), the judge decides instead, once every side is answered
(services/evaluator/judge.py): it accepts the fact in other words and rejects an answer that names
the expected string beside a wrong one. The question, the expected answers and the model's answer
are then sent to the judge's endpoint."""
from shared.domain.probes import (  # noqa: F401 - the evaluator's modules import them from here
    Probe,
    ProbeError,
    fact_rate,
    generate_answers,
    greedy_continuations,
    load_probes,
    passed_share,
    remembered,
)
