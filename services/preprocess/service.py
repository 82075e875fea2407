"""The preprocess service: a drop under incoming/<recipe>/ becomes a JobSubmitted, and every raw
JobSubmitted is prepared by the Spark job into datasets/<dataset_id>/."""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path, PurePosixPath

from shared.domain import events as ev
from shared.domain.access import AccessDenied, Caller
from shared.domain.jobs import CUSTOM_RECIPES, DEFAULT_TENANT, JobError, authorize_job, check_dataset_tenant
from shared.domain.model_policy import PolicyError, get_policy, govern, owner_check
from shared.domain.recipe import RecipeError, load_recipe, parse_recipe
from shared.platform.ports import InvalidObjectName
from shared.platform.runtime import Context, Service
from shared.platform.storage import upload_dir, validate_object_name

from services.preprocess import provenance

_RECIPE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")   # shared/domain/recipe.py's Recipe.name


def resolve_recipe(ctx: Context, bucket: str, name: str, tenant: str):
    """The tenant's own recipe of that name (recipes/<tenant>/<name>.yaml), else the built-in: one
    tenant's recipe never shadows a name for another."""
    custom = ctx.store.stat(bucket, f"{CUSTOM_RECIPES}/{tenant}/{name}.yaml")
    if custom is not None:
        return parse_recipe(ctx.store.read(bucket, custom.name).decode(), source=ctx.store.url(bucket, custom.name))
    return load_recipe(name)


log = logging.getLogger("ftpipe.preprocess")
_spark = None   # one handler at a time (max_messages=1): no lock needed


def spark_session():
    """One local Spark session per service process, started on first use (its JVM takes seconds),
    and started again if its JVM died: the job that was running when it died failed and is retried
    by redelivery, and that retry, like every later job, needs a live one."""
    global _spark
    from services.preprocess.spark import build_session, discard_session, session_alive

    if _spark is not None and not session_alive(_spark):
        log.warning("the Spark JVM is gone; starting a new one")
        discard_session(_spark)
        _spark = None
    if _spark is None:
        _spark = build_session()
    return _spark


def on_upload(event: ev.ObjectFinalized, ctx: Context):
    """incoming/<tenant>/<recipe>/<file> (or incoming/<recipe>/<file>, the default tenant's) →
    JobSubmitted with a run_id derived from the object and recipe, so a duplicated notification can
    never start a second run. A drop has no verified caller: the prefix it arrived under is its door,
    which acts as a submitter of that tenant and nothing more (shared/domain/jobs.py authorize_job);
    in the cloud only the tenant's principals may write there (infra/terraform)."""
    # GCS allows any name; a drop whose name could reach outside its folder, or whose recipe part is
    # a path (load_recipe would read a file of that name), is refused with the reason, not followed.
    if event.name.startswith("incoming/") and (problem := _unsafe_drop(event.name)):
        return [ev.DatasetRejected(run_id=ev.derive_run_id(event.bucket, event.name, event.generation, "?"),
                                   reason=f"drop refused: {problem}")]
    parts = PurePosixPath(event.name).parts
    if len(parts) not in (3, 4) or parts[0] != "incoming":
        ctx.log.info("ignoring object outside incoming/<tenant>/<recipe>/<file>", extra={"object": event.name})
        return []
    if provenance.is_sidecar(event.name):
        return []  # a drop's legal-basis sidecar, read with its data file
    tenant, recipe_name = (parts[1], parts[2]) if len(parts) == 4 else (DEFAULT_TENANT, parts[1])
    source = {"bucket": event.bucket, "object": event.name, "generation": event.generation,
              "md5": event.md5Hash, "size": int(event.size or 0), "uploaded_at": event.updated}
    source.update(_legal_sidecar(ctx, event.bucket, event.name))
    door = "/".join(parts[:-2]) + "/"
    try:
        recipe = resolve_recipe(ctx, event.bucket, recipe_name, tenant)
    except RecipeError as exc:
        run_id = ev.derive_run_id(event.bucket, event.name, event.generation, recipe_name, "?")
        return [ev.DatasetRejected(run_id=run_id, reason=f"drop {event.name}: {exc}")]
    run_id = ev.derive_run_id(event.bucket, event.name, event.generation, recipe.name, recipe.version)
    try:
        recipe, tenant = authorize_job(ctx.docs, Caller.for_door(tenant, door), recipe, tenant=tenant)
    except (AccessDenied, JobError) as exc:   # an AccessDenied's text is its reason
        return [ev.DatasetRejected(run_id=run_id, recipe=recipe, reason=f"drop {event.name} refused: {exc}")]
    return [ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=ctx.store.url(event.bucket, event.name),
                            tenant=tenant, source={**source, "by": f"door:{door}"})]


def on_job_request(event: ev.JobRequested, ctx: Context):
    """A job asked for on a tenant's Pub/Sub door (job-requests.<tenant>) → JobSubmitted, or
    DatasetRejected with the reason. Pub/Sub says nothing of who published: the door's topic, which
    only the tenant's principals may publish on, is the tenant, and the door acts as a submitter of it
    and nothing more, exactly as a drop under incoming/<tenant>/ does."""
    door = ctx.topic
    tenant = ev.door_tenant(door) or ""
    # the run's id comes from the door too: a tenant cannot name (and so shadow) another tenant's run
    run_id = ev.derive_run_id("door", door, event.run_id)
    refused = f"job request {event.run_id!r} on {door} refused: "
    if event.tenant != tenant:
        return [ev.DatasetRejected(run_id=run_id, reason=refused + f"it names tenant {event.tenant!r} and arrived on "
                                                                   f"the door of {tenant!r}; publish it on "
                                                                   f"{ev.door_topic(event.tenant)}")]
    bucket = ctx.settings.bucket
    try:
        recipe = resolve_recipe(ctx, bucket, event.recipe, tenant)
        recipe, tenant = authorize_job(ctx.docs, Caller.for_door(tenant, door), recipe, event.overrides, tenant=tenant)
        try:
            validate_object_name(ctx.store.parse_url(event.dataset_uri)[1].rstrip("/"))
        except ValueError as exc:
            raise JobError(f"dataset {event.dataset_uri!r} is not an object of this store ({exc})") from None
        check_dataset_tenant(ctx.docs, ctx.store, event.dataset_uri, tenant)
    except (AccessDenied, JobError, RecipeError) as exc:
        return [ev.DatasetRejected(run_id=run_id, reason=refused + str(exc))]
    return [ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=event.dataset_uri, tenant=tenant,
                            source={"by": f"door:{door}", "request": event.run_id})]


def _unsafe_drop(name: str) -> str | None:
    try:
        validate_object_name(name)
    except InvalidObjectName as exc:
        return f"{exc}; drop files as incoming/<recipe>/<file>"
    recipe_name = name.split("/")[1]
    if name.count("/") == 3:
        recipe_name = name.split("/")[2]
    if name.count("/") in (2, 3) and not _RECIPE_NAME.fullmatch(recipe_name):
        return (f"{name!r}: {recipe_name!r} is not a recipe name (a-z, 0-9 and '-', as in "
                "incoming/support-assistant/chats.jsonl)")
    return None


def _legal_sidecar(ctx: Context, bucket: str, name: str) -> dict:
    """{"legal_basis": ...} from incoming/<recipe>/<file>.legal.json when the drop wrote one."""
    info = ctx.store.stat(bucket, provenance.sidecar_name(name))
    if info is None:
        return {}
    try:
        doc = json.loads(ctx.store.read(bucket, info.name))
    except (ValueError, UnicodeDecodeError):
        return {"legal_basis_error": f"{info.name} is not a JSON object"}
    if not isinstance(doc, dict):
        return {"legal_basis_error": f"{info.name} is not a JSON object"}
    out = {k: str(doc[k]) for k in ("legal_basis", "legal_basis_by") if doc.get(k)}
    out["legal_basis_uri"] = ctx.store.url(bucket, info.name)
    return out


def pii_summary(out_dir: Path) -> dict:
    """What a privacy reviewer sees of pii_report.json: numbers only (it never holds values)."""
    path = out_dir / "pii_report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())

    def numeric(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return {k: v for k, v in report.items()
            if numeric(v) or (isinstance(v, dict) and all(numeric(x) for x in v.values()))}


def on_job(event: ev.JobSubmitted, ctx: Context):
    if event.prepared:
        return []  # already prepared: the trainer's
    from services.preprocess.job import prepare

    # The model's policy again, here where the data would be prepared: a job message that did not come
    # through shared/domain/jobs.py (published straight onto the bus) is held to it all the same.
    policy = get_policy(ctx.docs, event.recipe.model_name)
    try:
        owner_check(policy, event.recipe.model_name, event.tenant)
    except PolicyError as exc:
        return [ev.DatasetRejected(run_id=event.run_id, recipe=event.recipe, reason=str(exc))]
    event = event.model_copy(update={"recipe": govern(event.recipe, policy)})

    try:
        bucket, name = ctx.store.parse_url(event.dataset_uri)
        validate_object_name(name)
    except ValueError as exc:  # InvalidObjectName too: a URL of another store, or a name outside the bucket
        return [ev.DatasetRejected(run_id=event.run_id, recipe=event.recipe,
                                   reason=f"dataset {event.dataset_uri!r} cannot be read from this store: {exc}")]
    with tempfile.TemporaryDirectory(prefix="ftpipe-prep-") as tmp:
        out = Path(tmp) / "out"
        if ctx.settings.preprocess_runner == "dataproc":
            from services.preprocess.dataproc import prepare_on_dataproc, result_from_manifest

            result = result_from_manifest(prepare_on_dataproc(ctx, event, out), out)
        else:
            local = Path(tmp) / "input" / PurePosixPath(name).name
            local.parent.mkdir()
            ctx.store.download_file(bucket, name, str(local))
            result = prepare(spark_session(), str(local), event.recipe, out,
                             source={**event.source, "uri": event.dataset_uri, "run_id": event.run_id})
        pii = pii_summary(out)
        prefix = f"datasets/{result.dataset_id}"
        # Deterministic folder, write-if-absent: a redelivery re-uploads nothing that is there.
        upload_dir(ctx.store, out, bucket, prefix)
    folder = ctx.store.url(bucket, prefix + "/")
    ctx.log.info("dataset %s", "rejected" if result.rejected else "prepared",
                 extra={"dataset_id": result.dataset_id, **{f"n_{k}": v for k, v in result.counts.items()}})
    if result.rejected:
        return [ev.DatasetRejected(run_id=event.run_id, recipe=event.recipe, reason=result.reason,
                                   counts=result.counts, report_uri=folder)]
    common = dict(run_id=event.run_id, recipe=event.recipe, dataset_id=result.dataset_id, dataset_uri=folder,
                  counts=result.counts, tenant=event.tenant, tokens=result.tokens,
                  cost_estimate=result.cost_estimate)
    if event.recipe.data.privacy_review:
        # Held for sign-off: `ftpipe privacy approve` publishes the DatasetPrepared.
        return [ev.DatasetAwaitingReview(**common, pii=pii)]
    return [ev.DatasetPrepared(**common)]


SERVICE = Service(
    name="preprocess",
    handlers={ev.ObjectFinalized: on_upload, ev.JobSubmitted: on_job, ev.JobRequested: on_job_request},
    max_messages=1,
)
