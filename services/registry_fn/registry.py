"""The model registry: every evaluated candidate becomes a version with its bundle; it is promoted
when the gate passed and quarantined otherwise."""
from __future__ import annotations

import hashlib
import json
import time

from shared import events as ev
from shared.build_info import RUN_RECORD
from shared.model_registry import MODEL_VERSIONS, MODELS
from shared.privacy import read_manifest
from shared.runtime import Context, Service



def allocate_version(docs, name: str, run_id: str) -> str:
    """The next version of `name` for this run — the same one however often the run is redelivered."""
    def allocate(txn):
        doc = txn.get(MODELS, name) or {"name": name, "next_minor": 1, "runs": {}, "aliases": {}}
        if run_id in doc["runs"]:
            return doc["runs"][run_id]
        version = f"1.{doc['next_minor']}"
        doc["runs"][run_id] = version
        doc["next_minor"] += 1
        txn.set(MODELS, name, doc)
        return version
    return docs.transaction(allocate)


def register(event: ev.EvaluationCompleted, ctx: Context):
    recipe = event.recipe
    name = recipe.model_name
    version = allocate_version(ctx.docs, name, event.run_id)
    bucket, adapter_prefix = ctx.store.parse_url(event.adapter_uri)
    # A folder: the local store's parse_url drops the trailing slash, GCS keeps it. Without it, names
    # under the folder would start with "/" and sibling folders (adapter-old/) would match too.
    adapter_prefix = adapter_prefix.rstrip("/") + "/"
    target = f"models/{name}/{version}"
    files = []
    for info in ctx.store.list(bucket, adapter_prefix):
        rel = info.name[len(adapter_prefix):]
        if rel == "COMPLETE":
            continue
        data = ctx.store.read(bucket, info.name)
        if ctx.store.stat(bucket, f"{target}/adapter/{rel}") is None:
            ctx.store.write(bucket, f"{target}/adapter/{rel}", data)
        files.append({"name": f"adapter/{rel}", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    if not files:
        raise ev.MalformedMessage(f"adapter folder {event.adapter_uri} is empty; nothing to register")
    status = "promoted" if event.passed else "quarantined"
    previous = ctx.docs.get(MODEL_VERSIONS, f"{name}@{version}")  # a redelivery keeps its registration time
    bundle = {
        "name": name, "version": version, "status": status, "run_id": event.run_id,
        "base_model": recipe.base_model, "recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe.hash,
        "dataset_uri": event.dataset_uri, "dataset_manifest": event.dataset_uri + "manifest.json",
        "evaluation": {"passed": event.passed, "scores": event.scores, "reasons": event.reasons,
                       "report_uri": event.report_uri},
        "training_metrics": event.training_metrics, "files": files,
        # seed, code commit, dataset hashes and the package lockfile of the run (services/trainer/run_record.py)
        "run_record": next((f["name"] for f in files if f["name"] == f"adapter/{RUN_RECORD}"), None),
        "privacy_signoff": _privacy_signoff(ctx.store, event.dataset_uri),
        "registered_at": previous["registered_at"] if previous else time.time(),
    }
    ctx.store.write(bucket, f"{target}/MODEL_CARD.md", model_card(bundle).encode())
    ctx.store.write(bucket, f"{target}/bundle.json", json.dumps(bundle, indent=2).encode())  # last: the version is whole
    uri = ctx.store.url(bucket, target + "/")
    ctx.docs.set(MODEL_VERSIONS, f"{name}@{version}", {**{k: bundle[k] for k in (
        "name", "version", "status", "run_id", "base_model", "recipe_hash", "dataset_uri", "evaluation",
        "training_metrics", "registered_at")}, "uri": uri, "recipe_name": recipe.name})
    if event.passed:
        ctx.docs.transaction(lambda txn: _move_alias(txn, name, "production", version))
    outputs: list[ev.Event] = [ev.ModelRegistered(run_id=event.run_id, model_name=name, version=version, uri=uri,
                                                  status=status)]
    if event.passed:
        outputs.append(ev.ModelPromoted(run_id=event.run_id, model_name=name, version=version, uri=uri))
    else:
        outputs.append(ev.ModelQuarantined(run_id=event.run_id, model_name=name, version=version, uri=uri,
                                           reasons=event.reasons))
    return outputs


def _privacy_signoff(store, dataset_uri: str) -> dict | None:
    """The privacy sign-off recorded in the dataset's manifest (`ftpipe privacy approve`), if any.
    Read from the dataset folder rather than carried through TrainingCompleted/EvaluationCompleted."""
    try:
        manifest = read_manifest(store, dataset_uri)
    except ValueError:
        return None
    return (manifest or {}).get("privacy_signoff")


def _move_alias(txn, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`, never back to an older one: a redelivered evaluation of an earlier
    run must not undo the promotion of a later run."""
    doc = txn.get(MODELS, name)
    current = doc.setdefault("aliases", {}).get(alias)
    if current is not None and _version_key(current) > _version_key(version):
        return
    doc["aliases"][alias] = version
    txn.set(MODELS, name, doc)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def model_card(bundle: dict) -> str:
    evaluation = bundle["evaluation"]
    lines = [f"# {bundle['name']} {bundle['version']}", "",
             f"Status: **{bundle['status']}**. A LoRA adapter for `{bundle['base_model']}`, fine-tuned by ftpipe "
             f"run `{bundle['run_id']}` with recipe `{bundle['recipe']['name']}` v{bundle['recipe']['version']} "
             f"(hash {bundle['recipe_hash']}).", "",
             "## Intended use", "", bundle["recipe"].get("description") or "As described by the recipe's owners.", "",
             "## Evaluation against the base model", "", "| metric | base | candidate |", "|---|---|---|"]
    base, cand = evaluation["scores"].get("base", {}), evaluation["scores"].get("candidate", {})
    for metric in sorted(set(base) | set(cand)):
        lines.append(f"| {metric} | {base.get(metric, float('nan')):.4g} | {cand.get(metric, float('nan')):.4g} |")
    lines += ["", "Gate: " + ("passed" if evaluation["passed"] else "failed"), ""]
    lines += [f"- {reason}" for reason in evaluation["reasons"]]
    if bundle.get("privacy_signoff"):
        signoff = bundle["privacy_signoff"]
        lines += ["", "## Privacy review", "",
                  f"Training data approved by {signoff.get('approver')} at {signoff.get('at')}"
                  + (f" (residual PII rate seen: {signoff['residual_rate_seen']:.4%})"
                     if signoff.get("residual_rate_seen") is not None else "") + "."]
    lines += ["", "## Limitations", "",
              "Trained on the team's own data after PII masking; evaluated on a held-out split of that data only. "
              "It inherits the base model's limitations and may state trained facts with unwarranted confidence "
              "outside their domain.", ""]
    return "\n".join(lines)


SERVICE = Service(name="registry", handlers={ev.EVALUATIONS: {"EvaluationCompleted": register}})
