"""Knowledge probes: the file format, scoring and batched greedy generation live in
shared/domain/probes.py, shared with the trainer (which picks checkpoints on the val probes,
`training.select_by: probes`); the evaluator gates on the test probes."""
from shared.domain.probes import (  # noqa: F401 - the evaluator's modules import them from here
    Probe,
    ProbeError,
    fact_rate,
    generate_answers,
    greedy_continuations,
    load_probes,
)
