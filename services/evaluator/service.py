"""The evaluator service: on TrainingCompleted, score the base, the candidate and the model name's
production version (services/evaluator/evaluation.py), apply the gate, store the report with the
run, publish EvaluationCompleted.

Errors are not verdicts: a model that does not load or run (and anything else that goes wrong
besides a malformed artefact) is retried by the runtime, and on the subscription's last attempt
becomes EvaluationErrored plus a dead letter, never a failed gate. The registry then records the
version `unevaluated`, and `ftpipe models reevaluate` asks again."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from shared.domain import events as ev
from shared.domain.model_registry import alias_version
from shared.platform.runtime import Context, Reject, Retry, Service
from shared.platform.storage import download_dir, download_if_present


def on_training_completed(event: ev.TrainingCompleted, ctx: Context):
    try:
        return [_evaluate(event, ctx)]
    except (Retry, Reject, ev.MalformedMessage):
        raise
    except Exception as exc:  # noqa: BLE001 - loading or running a model, or fetching it: never a verdict
        if ctx.message.delivery_attempt < ctx.settings.max_delivery_attempts:
            raise  # the runtime nacks it: redelivered with backoff
        # The last attempt: the registry records the version `unevaluated` (re-evaluable, never
        # quarantined), then the message is dead-lettered with the reason. Published now, before
        # the Reject: the runtime publishes a handler's returned events only when it acks.
        attempts = ctx.message.delivery_attempt
        error = f"{type(exc).__name__}: {exc}"[:2000]
        ctx.log.error("evaluation errored on the last attempt (%d): %s", attempts, error, exc_info=exc)
        ctx.publish(ev.EvaluationErrored(
            run_id=event.run_id, recipe=event.recipe, dataset_uri=event.dataset_uri, adapter_uri=event.adapter_uri,
            training_metrics=event.metrics, steps=event.steps, tenant=event.tenant, error=error, attempts=attempts,
            reevaluation=event.reevaluation))
        name = event.recipe.model_name
        raise Reject(f"evaluation errored on all {attempts} attempts ({error}); the run's version of {name} is "
                     f"unevaluated, not quarantined: after the fix, `ftpipe models reevaluate {name} VERSION` "
                     f"(`ftpipe models show {name}` lists it)") from exc


def _evaluate(event: ev.TrainingCompleted, ctx: Context) -> ev.EvaluationCompleted:
    from services.evaluator.cache import StoreEntries
    from services.evaluator.evaluation import EvaluationError, ModelLoadError, evaluate

    recipe = event.recipe
    bucket, dataset_prefix = ctx.store.parse_url(event.dataset_uri)
    _, adapter_prefix = ctx.store.parse_url(event.adapter_uri)
    with tempfile.TemporaryDirectory(prefix="ftpipe-eval-") as tmp:
        data_dir, adapter_dir = Path(tmp) / "data", Path(tmp) / "adapter"
        download_dir(ctx.store, bucket, dataset_prefix, data_dir)
        download_dir(ctx.store, bucket, adapter_prefix, adapter_dir)
        probes = None
        if recipe.eval.probes:
            probes = download_if_present(ctx.store, bucket, recipe.eval.probes, Path(tmp) / "probes.jsonl")
            if probes is None:
                ctx.log.warning("knowledge probes %s not found in the bucket; skipping them", recipe.eval.probes)
        production = _production(ctx, recipe, Path(tmp) / "production")
        try:
            result = evaluate(recipe, data_dir, adapter_dir, production_dir=production, probes_path=probes,
                              cache=StoreEntries(ctx.store, bucket))
        except ModelLoadError:
            raise  # not a verdict (on_training_completed)
        except EvaluationError as exc:
            # A malformed artefact (test split, labels, probes, a candidate folder that is not a model):
            # no retry can fix it, and the version as trained cannot pass, so it is a failed gate
            # recorded with its reason.
            return _report(ctx, event, bucket, scores={}, passed=False, reasons=[f"evaluation failed: {exc}"],
                           markdown=f"# Evaluation failed\n\n{exc}\n", details={}, conclusive=True)
    return _report(ctx, event, bucket, scores=result.scores, passed=result.passed, reasons=result.reasons,
                   markdown=result.report_markdown, details=result.to_json(), held=bool(result.gate.get("held")),
                   conclusive=bool(result.gate.get("conclusive")))


def _production(ctx: Context, recipe, folder: Path) -> Path | None:
    """The model name's production version, downloaded, when it adapts the same base model."""
    if not recipe.eval.compare_production:
        return None
    version = alias_version(ctx.docs, recipe.model_name, "production")
    if version is None:
        return None
    if version.get("base_model") != recipe.base_model:
        ctx.log.info("production version %s adapts %s, not %s: not compared", version.get("version"),
                     version.get("base_model"), recipe.base_model)
        return None
    bucket, prefix = ctx.store.parse_url(version["uri"])
    download_dir(ctx.store, bucket, prefix.rstrip("/") + "/adapter", folder)
    return folder


def _report(ctx, event, bucket, *, scores, passed, reasons, markdown, details, held=False,
            conclusive=False) -> ev.EvaluationCompleted:
    # a re-evaluation's report beside the first one's, never over it
    prefix = f"runs/{event.run_id}/evaluation" + (f"-{event.reevaluation}" if event.reevaluation else "")
    ctx.store.write(bucket, f"{prefix}/report.md", markdown.encode())
    ctx.store.write(bucket, f"{prefix}/report.json", json.dumps(details, indent=2, default=str).encode())
    return ev.EvaluationCompleted(
        run_id=event.run_id, recipe=event.recipe, dataset_uri=event.dataset_uri, adapter_uri=event.adapter_uri,
        scores={side: {k: float(v) for k, v in values.items()} for side, values in scores.items()},
        passed=passed, reasons=reasons, report_uri=ctx.store.url(bucket, prefix + "/"),
        training_metrics=event.metrics, tenant=event.tenant, held=held, conclusive=conclusive, steps=event.steps,
        reevaluation=event.reevaluation)


SERVICE = Service(name="evaluator", handlers={ev.TrainingCompleted: on_training_completed},
                  max_messages=1, max_lease_s=6 * 3600)
