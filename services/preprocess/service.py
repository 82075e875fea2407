"""The preprocess service: a drop under incoming/<recipe>/ becomes a JobSubmitted, and every raw
JobSubmitted is prepared by the Spark job into datasets/<dataset_id>/."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path, PurePosixPath

from shared import events as ev
from shared.recipe import RecipeError, load_recipe, parse_recipe
from shared.runtime import Context, Service
from shared.storage import upload_dir

RECIPES_PREFIX = "recipes/"   # a team's own recipes, uploaded to the bucket, override built-ins


def resolve_recipe(ctx: Context, bucket: str, name: str):
    custom = ctx.store.stat(bucket, f"{RECIPES_PREFIX}{name}.yaml")
    if custom is not None:
        return parse_recipe(ctx.store.read(bucket, custom.name).decode(), source=ctx.store.url(bucket, custom.name))
    return load_recipe(name)


@functools.cache
def spark_session():
    """One local Spark session per service process, started on first use (its JVM takes seconds)."""
    from services.preprocess.spark import build_session

    return build_session()


def on_upload(event: ev.ObjectFinalized, ctx: Context):
    """incoming/<recipe>/<file> → JobSubmitted with a run_id derived from the object and recipe, so
    a duplicated notification can never start a second run."""
    parts = PurePosixPath(event.name).parts
    if len(parts) != 3 or parts[0] != "incoming":
        ctx.log.info("ignoring object outside incoming/<recipe>/<file>", extra={"object": event.name})
        return []
    recipe_name = parts[1]
    source = {"bucket": event.bucket, "object": event.name, "generation": event.generation,
              "md5": event.md5Hash, "size": int(event.size or 0), "uploaded_at": event.updated}
    try:
        recipe = resolve_recipe(ctx, event.bucket, recipe_name)
    except RecipeError as exc:
        run_id = ev.derive_run_id(event.bucket, event.name, event.generation, recipe_name, "?")
        return [ev.DatasetRejected(run_id=run_id, reason=f"drop {event.name}: {exc}")]
    run_id = ev.derive_run_id(event.bucket, event.name, event.generation, recipe.name, recipe.version)
    return [ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=ctx.store.url(event.bucket, event.name),
                            source=source)]


def on_job(event: ev.JobSubmitted, ctx: Context):
    if event.prepared:
        return []  # already prepared: the trainer's
    from services.preprocess.job import prepare

    bucket, name = ctx.store.parse_url(event.dataset_uri)
    with tempfile.TemporaryDirectory(prefix="ftpipe-prep-") as tmp:
        local = Path(tmp) / "input" / PurePosixPath(name).name
        local.parent.mkdir()
        ctx.store.download_file(bucket, name, str(local))
        out = Path(tmp) / "out"
        result = prepare(spark_session(), str(local), event.recipe, out,
                         source={**event.source, "uri": event.dataset_uri, "run_id": event.run_id})
        prefix = f"datasets/{result.dataset_id}"
        # Deterministic folder, write-if-absent: a redelivery re-uploads nothing that is there.
        upload_dir(ctx.store, out, bucket, prefix)
    folder = ctx.store.url(bucket, prefix + "/")
    ctx.log.info("dataset %s", "rejected" if result.rejected else "prepared",
                 extra={"dataset_id": result.dataset_id, **{f"n_{k}": v for k, v in result.counts.items()}})
    if result.rejected:
        return [ev.DatasetRejected(run_id=event.run_id, recipe=event.recipe, reason=result.reason,
                                   counts=result.counts, report_uri=folder)]
    return [ev.DatasetPrepared(run_id=event.run_id, recipe=event.recipe, dataset_id=result.dataset_id,
                               dataset_uri=folder, counts=result.counts, tenant=event.tenant)]


SERVICE = Service(
    name="preprocess",
    handlers={ev.DATASET_UPLOADS: {"OBJECT_FINALIZE": on_upload}, ev.JOBS: {"JobSubmitted": on_job}},
    max_messages=1,
)
