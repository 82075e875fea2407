"""The model registry's handlers: every evaluated candidate becomes a version with its bundle; the
gate and the recipe's `registry.approval` decide its status and aliases (shared/domain/model_registry.py).
A candidate whose evaluation errored (EvaluationErrored) becomes a version `unevaluated`, without a
bundle until `ftpipe models reevaluate` brings a verdict.

models/<name>/<version>/
  adapter/…                   the trainer's output as it left it (with run_record.json)
  recipe.json                 the resolved recipe the run trained with
  requirements.lock           the packages of the training environment (from the run record)
  dataset/manifest.json       the prepared dataset's manifest: source, legal basis, counts per stage
  dataset/pii_report.json     what PII masking found and the residual scan after it
  evaluation/report.json|md   the evaluator's report
  privacy_review.json         whether the recipe asked for a privacy sign-off, and the sign-off
  MODEL_CARD.md               generated from the bundle
  bundle.json                 written last: the version is whole once it exists

Everything the bundle needs is read and checked before anything is written: a missing part
dead-letters the evaluation with what is missing and where, and nothing of the version exists.

The version's document records the digests of its adapter files and of its bundle.json, where
writers of the bucket cannot change them (shared/domain/model_export.fetch_adapter checks them). The
bundle names the status the version registered with, which the registering transaction decides; so
the bundle is rendered for every status it may decide, the transaction records the digest of the one
for its status, and the bucket is made to hold that one. A crash before the rewrite leaves the other
rendering in the bucket (refused by serving as altered) until the redelivery rewrites it.
"""
from __future__ import annotations

import hashlib
import json

from shared.domain import events as ev
from shared.domain.model_policy import PolicyError, get_policy, govern, owner_check
from shared.domain.model_registry import (
    ADAPTER_DIR,
    MODEL_VERSIONS,
    MODELS,
    REGISTRATION_STATUSES,
    allocate_version,
    decided,
    register_unevaluated,
    register_version,
    registration_status,
    version_id,
)
from shared.domain.privacy import approved_signoff
from shared.platform.build_info import RUN_RECORD
from shared.platform.ports import ObjectNotFound
from shared.platform.runtime import Context, Reject, Service

__all__ = ["MODEL_VERSIONS", "MODELS", "SERVICE", "register", "register_errored", "model_card"]

COMPLETE = "COMPLETE"   # the trainer's marker that an adapter folder is whole: not part of the model


def governed(event: ev.EvaluationCompleted | ev.EvaluationErrored, ctx: Context):
    """The model's policy, not the message, decides who owns the name and whether approval and a
    privacy sign-off are needed: a job message forged onto the bus gets no further than this."""
    name = event.recipe.model_name
    policy = get_policy(ctx.docs, name)
    try:
        owner_check(policy, name, event.tenant)
    except PolicyError as exc:
        raise Reject(f"not registered: {exc}") from exc
    return govern(event.recipe, policy)


def register(event: ev.EvaluationCompleted, ctx: Context):
    recipe = governed(event, ctx)
    name = recipe.model_name
    store = ctx.store
    bucket, adapter_prefix = store.parse_url(event.adapter_uri)
    # A folder: the local store's parse_url drops the trailing slash, GCS keeps it. Without it, names
    # under the folder would start with "/" and sibling folders (adapter-old/) would match too.
    adapter_prefix = adapter_prefix.rstrip("/") + "/"
    adapter = [info.name[len(adapter_prefix):] for info in store.list(bucket, adapter_prefix)]
    adapter = [rel for rel in adapter if rel != COMPLETE]
    if not adapter:
        raise ev.MalformedMessage(f"adapter folder {event.adapter_uri} is empty; nothing to register")
    parts = _gather(ctx.docs, store, event, recipe, bucket, adapter_prefix)

    version = allocate_version(ctx.docs, name, event.run_id, recipe.base_model)
    target = f"models/{name}/{version}"
    files = [_copy(store, bucket, adapter_prefix + rel, f"{target}/adapter/{rel}", f"adapter/{rel}") for rel in adapter]
    for rel, data in parts["files"].items():
        files.append(_put(store, bucket, f"{target}/{rel}", rel, data))
    uri = store.url(bucket, target + "/")
    existing = ctx.docs.get(MODEL_VERSIONS, version_id(name, version))
    # A redelivery: registered already. (A version whose evaluation errored takes this verdict.)
    status = existing["registered_status"] if existing and decided(existing) else registration_status(
        ctx.docs.get(MODELS, name), version, passed=event.passed, approval=recipe.registry.approval, held=event.held)
    reports = _reports_folder(event)
    bundle = {
        "name": name, "version": version, "status": status, "run_id": event.run_id, "uri": uri,
        "base_model": recipe.base_model, "base_model_sha256": parts["base_model"]["sha256"],
        "base_model_files": parts["base_model"]["files"],
        "recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe.hash,
        "dataset_uri": event.dataset_uri, "dataset_id": parts["manifest"].get("dataset_id"),
        "dataset_manifest": "dataset/manifest.json", "pii_report": "dataset/pii_report.json",
        "evaluation": {"passed": event.passed, "scores": event.scores, "reasons": event.reasons,
                       "report_uri": event.report_uri, "report": f"{reports}/report.json",
                       "report_markdown": f"{reports}/report.md", "held": event.held,
                       "reevaluation": event.reevaluation},
        "training_metrics": event.training_metrics,
        # seed, code commit, dataset hashes and the package lockfile of the run (services/trainer/run_record.py)
        "run_record": f"adapter/{RUN_RECORD}", "lockfile": "requirements.lock", "recipe_file": "recipe.json",
        "privacy_review": "privacy_review.json", "privacy_signoff": parts["privacy"]["signoff"],
        "approval_required": recipe.registry.approval,
        "files": files,
    }
    doc = {k: bundle[k] for k in ("name", "version", "run_id", "uri", "base_model", "base_model_sha256", "recipe_hash",
                                  "dataset_uri", "dataset_id", "evaluation", "training_metrics")}
    doc["recipe_name"] = recipe.name
    doc["tenant"] = event.tenant
    doc["adapter_files"] = sorted((f for f in files if f["name"].startswith(ADAPTER_DIR)), key=lambda f: f["name"])
    if event.held or not event.passed:   # what `ftpipe models reevaluate` may publish again
        doc["evaluation_request"] = {"run_id": event.run_id, "recipe": recipe.model_dump(mode="json"),
                                     "dataset_uri": event.dataset_uri, "adapter_uri": event.adapter_uri,
                                     "metrics": event.training_metrics, "steps": event.steps, "tenant": event.tenant}
    rendered = {s: render_bundle({**bundle, "status": s}, parts) for s in REGISTRATION_STATUSES}
    _write_bundle(store, bucket, target, rendered[status])
    stored, events = register_version(ctx.docs, doc, passed=event.passed, reasons=event.reasons,
                                      approval=recipe.registry.approval, held=event.held, conclusive=event.conclusive,
                                      reevaluation=event.reevaluation,
                                      bundle_sha256={s: _sha256(r["bundle.json"]) for s, r in rendered.items()})
    if stored["registered_status"] != status:
        # Another registration of this model committed between the read above and the transaction
        # (the transaction decides): the bundle says what happened, and is the one whose digest it recorded.
        _write_bundle(store, bucket, target, rendered[stored["registered_status"]])
    return events


def _reports_folder(event: ev.EvaluationCompleted) -> str:
    """Where the bundle keeps this evaluation's report: a re-evaluation's beside the first one's."""
    return "evaluation" + (f"-{event.reevaluation}" if event.reevaluation else "")


def register_errored(event: ev.EvaluationErrored, ctx: Context):
    """An evaluation that errored on every attempt: the run's version is allocated and recorded
    `unevaluated` (not quarantined: a fault is not a verdict), with what `ftpipe models reevaluate`
    needs to ask again. Its bundle is written once a verdict comes (register)."""
    recipe = governed(event, ctx)
    name = recipe.model_name
    version = allocate_version(ctx.docs, name, event.run_id, recipe.base_model)
    bucket, _ = ctx.store.parse_url(event.adapter_uri)
    # the fields of the TrainingCompleted a re-evaluation publishes (model_registry.reevaluate, by a person
    # through the tracker or the CLI): data here, since the registry itself publishes no training event
    request = {"run_id": event.run_id, "recipe": recipe.model_dump(mode="json"), "dataset_uri": event.dataset_uri,
               "adapter_uri": event.adapter_uri, "metrics": event.training_metrics, "steps": event.steps,
               "tenant": event.tenant}
    doc = {"name": name, "version": version, "run_id": event.run_id,
           "uri": ctx.store.url(bucket, f"models/{name}/{version}/"),   # where the bundle will be
           "base_model": recipe.base_model, "recipe_hash": recipe.hash, "recipe_name": recipe.name,
           "dataset_uri": event.dataset_uri, "training_metrics": event.training_metrics, "tenant": event.tenant,
           "evaluation": {"error": event.error, "attempts": event.attempts},
           "evaluation_request": request}
    _, events = register_unevaluated(ctx.docs, doc, error=event.error, approval=recipe.registry.approval,
                                     reevaluation=event.reevaluation)
    return events


def _gather(docs, store, event: ev.EvaluationCompleted, recipe, bucket: str, adapter_prefix: str) -> dict:
    """Every part of the bundle besides the adapter, read and checked before anything is written."""
    record = _json(store, bucket, adapter_prefix + RUN_RECORD, f"the run record ({RUN_RECORD}) of adapter folder "
                   f"{event.adapter_uri}", "the trainer writes it beside the adapter; retrain with this ftpipe")
    base = record.get("base_model") or {}
    if not base.get("sha256"):
        raise Reject(f"the run record of {event.adapter_uri} has no content hash of the base model "
                     f"({recipe.base_model!r}): it was trained by an older trainer, or the base model's files could "
                     "not be found after loading; retrain with this ftpipe")
    if base.get("ref") != recipe.base_model:
        raise Reject(f"the run record of {event.adapter_uri} names base model {base.get('ref')!r}, the recipe "
                     f"{recipe.base_model!r}: the adapter is not this run's")
    packages = record.get("packages") or {}
    if not packages:
        raise Reject(f"the run record of {event.adapter_uri} lists no packages: no lockfile for the bundle; retrain")
    dataset_bucket, dataset_prefix = store.parse_url(event.dataset_uri)
    dataset_prefix = dataset_prefix.rstrip("/") + "/"
    how = "only datasets prepared by ftpipe (a drop, a job with raw data, or `ftpipe prepare`) can be registered"
    manifest_raw = _read(store, dataset_bucket, dataset_prefix + "manifest.json",
                         f"the dataset manifest of {event.dataset_uri}", how)
    manifest = _parse(manifest_raw, store.url(dataset_bucket, dataset_prefix + "manifest.json"))
    pii_raw = _read(store, dataset_bucket, dataset_prefix + "pii_report.json",
                    f"the PII report of {event.dataset_uri}", how)
    report_bucket, report_prefix = store.parse_url(event.report_uri)
    report_prefix = report_prefix.rstrip("/") + "/"
    reports = {rel: _read(store, report_bucket, report_prefix + rel, f"the evaluation report {rel} at {event.report_uri}",
                          "the evaluator writes report.json and report.md; re-run the evaluation")
               for rel in ("report.json", "report.md")}
    signoff = manifest.get("privacy_signoff")
    # The sign-off documents are the authority (written only by an approver through
    # shared/domain/privacy.py); the manifest's copy is a bucket object anyone with write access can edit.
    dataset_id = manifest.get("dataset_id") or (signoff or {}).get("dataset_id")
    authority = approved_signoff(docs, dataset_id) if dataset_id else None
    if recipe.data.privacy_review and (not signoff or authority is None):
        raise Reject(f"recipe {recipe.name} (or model {recipe.model_name}'s policy) requires a privacy sign-off and "
                     f"dataset {event.dataset_uri} has no approver's sign-off on record: approve the dataset "
                     "(`ftpipe privacy approve RUN`) and retrain")
    privacy = {"required": recipe.data.privacy_review, "signoff": signoff, "dataset_id": manifest.get("dataset_id")}
    lockfile = "".join(f"{name}=={version}\n" for name, version in sorted(packages.items()))
    return {
        "base_model": base, "manifest": manifest,
        "pii": _parse(pii_raw, store.url(dataset_bucket, dataset_prefix + "pii_report.json")),
        "privacy": privacy,
        "files": {
            "recipe.json": json.dumps(recipe.model_dump(mode="json"), indent=2).encode(),
            "requirements.lock": lockfile.encode(),
            "dataset/manifest.json": manifest_raw,
            "dataset/pii_report.json": pii_raw,
            f"{_reports_folder(event)}/report.json": reports["report.json"],
            f"{_reports_folder(event)}/report.md": reports["report.md"],
            "privacy_review.json": json.dumps(privacy, indent=2).encode(),
        },
    }


def _read(store, bucket: str, name: str, what: str, how: str) -> bytes:
    try:
        return store.read(bucket, name)
    except (ObjectNotFound, KeyError):
        raise Reject(f"cannot register: {what} is missing ({store.url(bucket, name)}); {how}") from None


def _parse(data: bytes, where: str) -> dict:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise Reject(f"cannot register: {where} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise Reject(f"cannot register: {where} is not a JSON object")
    return parsed


def _json(store, bucket: str, name: str, what: str, how: str) -> dict:
    return _parse(_read(store, bucket, name, what, how), store.url(bucket, name))


def _copy(store, bucket: str, source: str, target: str, rel: str) -> dict:
    return _put(store, bucket, target, rel, store.read(bucket, source))


def _put(store, bucket: str, target: str, rel: str, data: bytes) -> dict:
    """Write one file of the version unless a redelivery wrote it already."""
    if store.stat(bucket, target) is None:
        store.write(bucket, target, data)
    return {"name": rel, "sha256": _sha256(data), "size": len(data)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_bundle(bundle: dict, parts: dict) -> dict[str, bytes]:
    """The bytes of MODEL_CARD.md and bundle.json (which lists the card's sha256) for `bundle`."""
    card = model_card(bundle, parts).encode()
    files = [f for f in bundle["files"] if f["name"] != "MODEL_CARD.md"]
    files.append({"name": "MODEL_CARD.md", "sha256": _sha256(card), "size": len(card)})
    return {"MODEL_CARD.md": card, "bundle.json": json.dumps({**bundle, "files": files}, indent=2).encode()}


def _write_bundle(store, bucket: str, target: str, rendered: dict[str, bytes]) -> None:
    store.write(bucket, f"{target}/MODEL_CARD.md", rendered["MODEL_CARD.md"])
    store.write(bucket, f"{target}/bundle.json", rendered["bundle.json"])


_KINDS = {"lora": "A LoRA adapter", "qlora": "A QLoRA adapter", "prefix": "A prefix-tuning adapter",
          "full": "A whole fine-tuned model"}
_TASKS = {"chat_sft": "a chat assistant", "classification": "a text classifier"}
_METHODS = {"sft": "supervised fine-tuning", "dpo": "direct preference optimisation (DPO)",
            "orpo": "odds-ratio preference optimisation (ORPO)"}


def model_card(bundle: dict, parts: dict) -> str:
    """MODEL_CARD.md: what the version is for, what it was trained on, how it compares with the base
    and production models, why the gate decided as it did, and what it cannot be trusted with."""
    recipe, evaluation = bundle["recipe"], bundle["evaluation"]
    what = _KINDS.get(recipe.get("adapter", {}).get("kind"), "An adapter")
    lines = [f"# {bundle['name']} {bundle['version']}", "",
             f"Status at registration: **{bundle['status']}**. {what} for `{bundle['base_model']}` "
             f"(base model sha256 `{bundle['base_model_sha256'][:16]}…`), trained by ftpipe run `{bundle['run_id']}` "
             f"with recipe `{recipe['name']}` v{recipe['version']} (hash {bundle['recipe_hash']}): "
             f"{_TASKS.get(recipe.get('task'), recipe.get('task'))}, {_METHODS.get(recipe.get('method'), recipe.get('method'))}.",
             "", "## Intended use", "",
             recipe.get("description") or "As described by the recipe's owners.", "",
             f"Use it through the `production` alias of `{bundle['name']}`, which only ever points at a version that "
             "passed the evaluation gate" + (" and was approved by a person" if bundle.get("approval_required") else "")
             + ". Not for uses its training data does not cover (below).", ""]
    lines += ["## Training data", ""] + _data_summary(parts["manifest"], parts["pii"], bundle.get("privacy_signoff"),
                                                         parts["privacy"]["required"])
    scores = evaluation["scores"]
    sides = [side for side in ("base", "candidate", "production") if side in scores]
    lines += ["", "## Evaluation", "",
              "Scores on the held-out test split and probes; `production` is the version that served when this one "
              "was evaluated (absent for the first version).", "",
              "| metric | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]
    for metric in sorted(set().union(*(scores[s] for s in sides)) if sides else ()):
        lines.append(f"| {metric} | " + " | ".join(_fmt(scores[s].get(metric)) for s in sides) + " |")
    lines += ["", "Gate: " + ("passed" if evaluation["passed"] else "failed"), ""]
    lines += [f"- {reason}" for reason in evaluation["reasons"]]
    lines += ["", "## Limitations", "",
              "Trained on the team's own data after PII masking; evaluated on a held-out split of that data and "
              "ftpipe's safety, memorisation and fairness probes only. It inherits the base model's limitations "
              "and may state trained facts with unwarranted confidence outside their domain."]
    if not evaluation["passed"]:
        lines += ["", "This version failed the gate: it is quarantined and must not be served."]
    lines += ["", "## Files", "",
              "`bundle.json` lists every file of this version with its sha256: the adapter, the run record (seed, "
              "code commit, hardware), `requirements.lock`, `recipe.json`, the dataset manifest and PII report, "
              "the evaluation report and the privacy review. `ftpipe models export "
              f"{bundle['name']} {bundle['version']} --out DIR` writes merged safetensors weights and the adapter "
              "in the layout vLLM loads.", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _data_summary(manifest: dict, pii: dict, signoff: dict | None, review_required: bool) -> list[str]:
    counts = manifest.get("counts") or {}
    lines = [f"- dataset `{manifest.get('dataset_id')}` from `{manifest.get('source_uri') or '?'}`"
             + (f" (input sha256 `{manifest['input_sha256'][:16]}…`)" if manifest.get("input_sha256") else ""),
             f"- legal basis: {manifest.get('legal_basis') or 'not recorded'}"]
    if counts:
        lines.append("- rows: " + ", ".join(f"{stage} {n}" for stage, n in counts.items()))
    tokens = (manifest.get("tokens") or {}).get("train")
    if isinstance(tokens, dict) and tokens.get("tokens") is not None:
        lines.append(f"- training tokens: {tokens['tokens']}")
    masked = {k: v for k, v in (pii.get("counts") or {}).items() if v}
    lines.append("- PII masked: " + (", ".join(f"{k} {v}" for k, v in masked.items()) or "none found")
                 + (f"; residual rate after masking {pii['residual_rate']:.4%}" if pii.get("residual_rate") is not None
                    else ""))
    if signoff:
        lines.append(f"- privacy review: approved by {signoff.get('approver')} at {signoff.get('at')}"
                     + (f" (residual PII rate seen: {signoff['residual_rate_seen']:.4%})"
                        if signoff.get("residual_rate_seen") is not None else ""))
    else:
        lines.append("- privacy review: " + ("required, missing" if review_required else "not required by the recipe"))
    return lines


SERVICE = Service(name="registry", handlers={ev.EvaluationCompleted: register, ev.EvaluationErrored: register_errored})
