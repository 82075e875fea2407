"""The preprocess job as a Dataproc Serverless batch (settings `preprocess_runner: dataproc`).

The batch runs the same Spark application as the local runner: `main_python_file_uri` is
services/preprocess/job.py copied to the bucket, `python_file_uris` the ftpipe wheel (so
`services.*` and `shared.*` import on the driver and the executors), and the arguments are the job's
own command line (--input, --recipe as JSON, --out, --source-json). The batch id derives from the
run id, so a redelivered JobSubmitted finds the batch already created instead of starting another
(and `request_id` makes the create call itself idempotent).

`build_batch_request` is a pure function (tests check the request); `submit_batch` calls
BatchControllerClient.create_batch on the regional endpoint. Locally the job runs in-process.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.domain.recipe import Recipe
from shared.platform.config import Settings

# Spark settings for a small batch: the job is I/O- and Python-bound, not memory hungry.
DEFAULT_PROPERTIES = {
    "spark.executor.instances": "2",
    "spark.dynamicAllocation.maxExecutors": "10",
    "spark.sql.shuffle.partitions": "64",
    "spark.python.worker.reuse": "true",
}


class DataprocConfigError(ValueError):
    pass


def batch_id_for(run_id: str) -> str:
    """4-63 of [a-z0-9-], starting with a letter: deterministic per run."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    return f"ftpipe-prep-{slug}"[:63].rstrip("-")


def build_batch_request(settings: Settings, *, run_id: str, input_uri: str, recipe: Recipe, out_uri: str,
                        source: dict[str, Any], properties: dict[str, str] | None = None):
    """The CreateBatchRequest for one preprocess run (no API call)."""
    from google.cloud import dataproc_v1

    missing = [name for name in ("dataproc_main_uri", "dataproc_wheel_uri") if not getattr(settings, name)]
    if missing:
        raise DataprocConfigError(f"preprocess_runner=dataproc needs {', '.join(missing)} "
                                  f"(FTPIPE_{missing[0].upper()}): the job entrypoint and the ftpipe wheel in GCS")
    batch_id = batch_id_for(run_id)
    execution = dataproc_v1.ExecutionConfig(
        service_account=settings.dataproc_service_account or "",
        subnetwork_uri=settings.dataproc_subnetwork or "",
    )
    batch = dataproc_v1.Batch(
        pyspark_batch=dataproc_v1.PySparkBatch(
            main_python_file_uri=settings.dataproc_main_uri,
            python_file_uris=[settings.dataproc_wheel_uri],
            args=["--input", input_uri, "--recipe", recipe.model_dump_json(), "--out", out_uri,
                  "--source-json", json.dumps(source, sort_keys=True)],
        ),
        runtime_config=dataproc_v1.RuntimeConfig(
            version=settings.dataproc_runtime_version,
            # ftpipe's own dependencies (pydantic, pyyaml, transformers for token counts) come with a
            # custom image built from the runtime's base; the wheel on python_file_uris is ftpipe itself.
            container_image=settings.dataproc_container_image or "",
            properties={**DEFAULT_PROPERTIES, **(properties or {})},
        ),
        environment_config=dataproc_v1.EnvironmentConfig(execution_config=execution),
        labels={"app": "ftpipe", "stage": "preprocess", "recipe": recipe.name,
                "run": batch_id_for(run_id)[len("ftpipe-prep-"):][:63]},
    )
    return dataproc_v1.CreateBatchRequest(
        parent=f"projects/{settings.project}/locations/{settings.dataproc_region}",
        batch=batch, batch_id=batch_id, request_id=batch_id[-40:].lstrip("-"),
    )


def submit_batch(settings: Settings, request, *, client=None):
    """Create the batch; returns the long-running operation (`.result()` waits for the batch).
    A batch that already exists (a redelivery) is returned through get_batch instead."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import dataproc_v1

    if client is None:
        client = dataproc_v1.BatchControllerClient(
            client_options={"api_endpoint": f"{settings.dataproc_region}-dataproc.googleapis.com:443"})
    try:
        return client.create_batch(request=request)
    except AlreadyExists:
        return client.get_batch(name=f"{request.parent}/batches/{request.batch_id}")


def upload_out(local_dir: Path, out_uri: str) -> None:
    """On the Dataproc driver: the prepared folder to gs://bucket/prefix/ (google-cloud-storage only,
    so the batch needs nothing else of ours to write its output)."""
    from google.cloud import storage

    bucket_name, _, prefix = out_uri.removeprefix("gs://").partition("/")
    bucket = storage.Client().bucket(bucket_name)
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        bucket.blob(f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}").upload_from_filename(str(path))


def staging_prefix(run_id: str) -> str:
    return f"staging/{run_id}/prepared"


def prepare_on_dataproc(ctx, event, out: Path, *, client=None, timeout_s: float = 6 * 3600) -> dict:
    """Run the job of one JobSubmitted as a batch and bring its output folder to `out` (the same
    folder the in-process runner fills); returns its manifest. The caller uploads and publishes."""
    from shared.platform.storage import download_dir

    bucket, _ = ctx.store.parse_url(event.dataset_uri)
    prefix = staging_prefix(event.run_id)
    request = build_batch_request(ctx.settings, run_id=event.run_id, input_uri=event.dataset_uri,
                                  recipe=event.recipe, out_uri=ctx.store.url(bucket, prefix + "/"),
                                  source={**event.source, "uri": event.dataset_uri, "run_id": event.run_id})
    ctx.log.info("submitting Dataproc batch", extra={"batch_id": request.batch_id})
    operation = submit_batch(ctx.settings, request, client=client)
    if hasattr(operation, "result"):
        operation.result(timeout=timeout_s)  # the batch's own failure raises here: the runtime retries
    download_dir(ctx.store, bucket, prefix, out)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise RuntimeError(f"Dataproc batch {request.batch_id} finished without {prefix}/manifest.json")
    return json.loads(manifest_path.read_text())


def result_from_manifest(manifest: dict, out: Path):
    """The PrepareResult of a batch, from the manifest it wrote."""
    from services.preprocess.job import PrepareResult

    rejected = manifest.get("status") != "prepared"
    tokens = manifest.get("tokens")
    return PrepareResult(dataset_id=manifest["dataset_id"], rejected=rejected, reason=manifest.get("reason"),
                         counts=manifest.get("counts", {}), out_dir=out,
                         files={p.name: p for p in out.iterdir() if p.is_file()},
                         timings=manifest.get("timings", {}),
                         tokens=None if rejected or not tokens or "error" in tokens else tokens,
                         cost_estimate=manifest.get("cost_estimate"))
