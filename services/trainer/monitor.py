"""Watching a training run: the alerts that stop money being wasted, as a pure state machine.

The loop feeds it every step's metrics and every validation loss; it answers with alerts, each
either a warning or a stop:

- `non_finite_loss`  loss is NaN or inf: stop (nothing after it can be trusted);
- `grad_norm`        the pre-clipping gradient norm above `training.grad_norm_alert`: warning
                     (clipping keeps the step bounded, but a run that keeps spiking is diverging);
- `val_loss_rising`  validation loss higher than the evaluation before it, `early_stop_evals` times
                     in a row: stop early, and the run's result is its best checkpoint;
- `val_probes_plateau` (`training.select_by: probes`) the fact rate on the val probes not better
                     than the best so far `early_stop_evals` evaluations in a row, or 1 (nothing
                     left to gain): stop; the run's result is its best checkpoint either way;
- `budget`           the cost so far extrapolated to the last step above `budget.max_cost` x
                     `budget.overrun`: stop (the run fails; its checkpoints stay for inspection).

Cost so far = training seconds x hardware.count x hardware.nodes x price per GPU-hour / 3600
(`hardware.price_per_gpu_hour` or the GPU table's).

The best evaluation is the lowest validation loss, or with `select_by: probes` the highest val-probe
fact rate (ties: the lower validation loss). Its state (best evaluation, the rising or stale streak, warnings already given) travels in checkpoints so
that a resumed run makes the same decisions as one that never stopped.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.domain.recipe import Recipe


@dataclass(frozen=True)
class Alert:
    kind: str          # non_finite_loss | grad_norm | val_loss_rising | val_probes_plateau | budget | out_of_memory
    step: int
    message: str
    value: float | None
    threshold: float | None
    stop: bool


# Stops that end a run as planned, with its best checkpoint as the result (not failures).
EARLY_STOPS = frozenset({"val_loss_rising", "val_probes_plateau"})


@dataclass
class MonitorState:
    best_step: int | None = None
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    rising: int = 0                                  # evaluations in a row with a higher val loss
    best_score: float | None = None                  # select_by probes: the best val-probe fact rate
    stale: int = 0                                   # select_by probes: evaluations in a row not better
    evaluations: list[dict] = field(default_factory=list)


def cost_per_second(recipe: Recipe) -> float:
    return recipe.hardware.total_gpus * recipe.hardware.gpu_price / 3600


class Monitor:
    def __init__(self, recipe: Recipe, total_steps: int, state: MonitorState | None = None):
        self.spec = recipe.training
        self.budget = recipe.budget
        self.total_steps = total_steps
        self.rate = cost_per_second(recipe)
        self.state = state or MonitorState()

    def cost(self, seconds: float) -> float:
        return round(seconds * self.rate, 6)

    def on_step(self, step: int, loss: float, grad_norm: float, seconds: float) -> list[Alert]:
        """After each optimizer step (seconds: training time so far, resumes included)."""
        alerts = []
        if not math.isfinite(loss):
            alerts.append(Alert("non_finite_loss", step, f"loss became {loss} at step {step}; lower "
                                f"training.learning_rate (now {self.spec.learning_rate}) or add warmup_steps",
                                None, None, stop=True))
        if math.isfinite(grad_norm) and grad_norm > self.spec.grad_norm_alert:
            alerts.append(Alert("grad_norm", step, f"gradient norm {grad_norm:.3g} at step {step} is above "
                                f"{self.spec.grad_norm_alert:g} (clipped to {self.spec.max_grad_norm:g}); a run that "
                                "keeps spiking is diverging: lower training.learning_rate", grad_norm,
                                self.spec.grad_norm_alert, stop=False))
        if self.budget.max_cost is not None and step:
            projected = self.cost(seconds) / step * self.total_steps
            limit = self.budget.max_cost * self.budget.overrun
            if projected > limit:
                alerts.append(Alert("budget", step, f"projected cost {projected:.2f} for {self.total_steps} steps is "
                                    f"above budget.max_cost {self.budget.max_cost:g} x {self.budget.overrun:g}; "
                                    "stopped (raise the budget, or lower training.epochs / max_steps)",
                                    round(projected, 4), limit, stop=True))
        return alerts

    def on_eval(self, step: int, val_loss: float, score: float | None = None) -> list[Alert]:
        """After a validation pass at `step`; `score`: the val-probe fact rate (select_by probes)."""
        if self.spec.select_by == "probes":
            if score is None:
                raise ValueError("training.select_by is probes: each evaluation needs the val-probe fact rate")
            return self._on_score(step, val_loss, score)
        st = self.state
        st.evaluations.append({"step": step, "val_loss": val_loss})
        if st.best_val_loss is None or val_loss < st.best_val_loss:
            st.best_step, st.best_val_loss = step, val_loss
        st.rising = st.rising + 1 if st.last_val_loss is not None and val_loss > st.last_val_loss else 0
        st.last_val_loss = val_loss
        patience = self.spec.early_stop_evals
        if patience and st.rising >= patience:
            return [Alert("val_loss_rising", step, f"validation loss rose {st.rising} evaluations in a row "
                          f"(now {val_loss:.4f}); stopped early, keeping the best checkpoint (step {st.best_step}, "
                          f"val_loss {st.best_val_loss:.4f})", val_loss, st.best_val_loss, stop=True)]
        return []

    def _on_score(self, step: int, val_loss: float, score: float) -> list[Alert]:
        st = self.state
        st.evaluations.append({"step": step, "val_loss": val_loss, "score": score})
        best = (st.best_score is None or score > st.best_score
                or (score == st.best_score and st.best_val_loss is not None and val_loss < st.best_val_loss))
        if best:
            st.best_step, st.best_score, st.best_val_loss, st.stale = step, score, val_loss, 0
        else:
            st.stale += 1
        if self._plateaued():
            why = "every val probe passes" if st.best_score == 1.0 else (
                f"the val-probe fact rate has not improved for {st.stale} evaluations (now {score:.3f})")
            return [Alert("val_probes_plateau", step, f"{why}; stopped, keeping the best checkpoint (step "
                          f"{st.best_step}, fact rate {st.best_score:.3f})", score, st.best_score, stop=True)]
        return []

    def _plateaued(self) -> bool:
        st, patience = self.state, self.spec.early_stop_evals
        return st.best_score == 1.0 or bool(patience and st.stale >= patience)

    def stopped_early(self) -> bool:
        """Whether the evaluations so far already ended the run (a resume after the early stop)."""
        if self.spec.select_by == "probes":
            return self._plateaued()
        return bool(self.spec.early_stop_evals) and self.state.rising >= self.spec.early_stop_evals

    def state_dict(self) -> dict:
        return asdict(self.state)

    @staticmethod
    def load_state(data: dict | None) -> MonitorState:
        return MonitorState(**data) if data else MonitorState()
