"""The run documents' collection and the statuses that end a run: a module of its own so that the
registry function, which reads runs (four eyes) but ships without the job and memory-planning code,
can name them (infra/functions/registry/requirements.txt)."""

RUNS = "runs"   # runs/{run_id}: the run documents the tracker writes (services/tracker/lineage.py)
TERMINAL = ("succeeded", "failed", "cancelled")
