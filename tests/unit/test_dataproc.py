"""The Dataproc Serverless batch request for the preprocess job (built, never sent)."""
import json

import pytest

pytest.importorskip("google.cloud.dataproc_v1")

from shared.domain.recipe import load_recipe  # noqa: E402
from shared.platform.config import Settings  # noqa: E402
from tests.unit.governance import own

from services.preprocess.dataproc import DataprocConfigError, batch_id_for, build_batch_request, submit_batch  # noqa: E402

SETTINGS = Settings(profile="gcp", project="acme-ml", bucket="acme-ftpipe", preprocess_runner="dataproc",
                    dataproc_region="europe-west4", dataproc_service_account="prep@acme-ml.iam.gserviceaccount.com",
                    dataproc_subnetwork="projects/acme-ml/regions/europe-west4/subnetworks/ml",
                    dataproc_wheel_uri="gs://acme-ftpipe/dist/ftpipe-0.1.0-py3-none-any.whl",
                    dataproc_main_uri="gs://acme-ftpipe/dist/preprocess_job.py")
RECIPE = load_recipe("tiny-sft")
SOURCE = {"bucket": "acme-ftpipe", "object": "incoming/tiny-sft/chats.jsonl", "generation": "17",
          "legal_basis": "contract, DPA-2026-04"}


def request(**kw):
    return build_batch_request(SETTINGS, run_id="run-0123456789abcdef", input_uri="gs://acme-ftpipe/incoming/tiny-sft/chats.jsonl",
                               recipe=RECIPE, out_uri="gs://acme-ftpipe/staging/run-0123456789abcdef/", source=SOURCE, **kw)


def test_batch_request():
    req = request(properties={"spark.executor.instances": "4"})
    assert req.parent == "projects/acme-ml/locations/europe-west4"
    assert req.batch_id == "ftpipe-prep-run-0123456789abcdef"
    assert 4 <= len(req.batch_id) <= 63 and 0 < len(req.request_id) <= 40
    job = req.batch.pyspark_batch
    assert job.main_python_file_uri == "gs://acme-ftpipe/dist/preprocess_job.py"
    assert list(job.python_file_uris) == ["gs://acme-ftpipe/dist/ftpipe-0.1.0-py3-none-any.whl"]
    args = list(job.args)
    assert args[args.index("--input") + 1] == "gs://acme-ftpipe/incoming/tiny-sft/chats.jsonl"
    assert args[args.index("--out") + 1] == "gs://acme-ftpipe/staging/run-0123456789abcdef/"
    assert json.loads(args[args.index("--recipe") + 1]) == RECIPE.model_dump(mode="json")
    assert json.loads(args[args.index("--source-json") + 1]) == SOURCE
    runtime = req.batch.runtime_config
    assert runtime.version == "3.0" and runtime.properties["spark.executor.instances"] == "4"
    execution = req.batch.environment_config.execution_config
    assert execution.service_account == "prep@acme-ml.iam.gserviceaccount.com"
    assert execution.subnetwork_uri.endswith("/subnetworks/ml")
    assert req.batch.labels["recipe"] == "tiny-sft"


def test_the_recipe_argument_is_what_the_job_parses():
    from services.preprocess.job import _load_recipe_arg

    args = list(request().batch.pyspark_batch.args)
    assert _load_recipe_arg(args[args.index("--recipe") + 1]) == RECIPE


def test_deterministic_and_valid_ids():
    assert request() == request()
    assert batch_id_for("Run_ABC/1") == "ftpipe-prep-run-abc-1"
    assert len(batch_id_for("x" * 200)) == 63


def test_missing_settings_say_what_to_set():
    with pytest.raises(DataprocConfigError, match="dataproc_main_uri"):
        build_batch_request(Settings(), run_id="r", input_uri="gs://b/x", recipe=RECIPE, out_uri="gs://b/o", source={})


def test_submit_uses_create_batch_and_tolerates_a_redelivery():
    from google.api_core.exceptions import AlreadyExists

    class FakeClient:
        def __init__(self, exists):
            self.exists, self.calls = exists, []

        def create_batch(self, request):
            self.calls.append(("create", request.batch_id))
            if self.exists:
                raise AlreadyExists("batch exists")
            return "operation"

        def get_batch(self, name):
            self.calls.append(("get", name))
            return "batch"

    fresh, again = FakeClient(False), FakeClient(True)
    assert submit_batch(SETTINGS, request(), client=fresh) == "operation"
    assert submit_batch(SETTINGS, request(), client=again) == "batch"
    assert again.calls[-1] == ("get", "projects/acme-ml/locations/europe-west4/batches/ftpipe-prep-run-0123456789abcdef")


def test_the_service_runs_the_job_as_a_batch_when_settings_say_dataproc(tmp_path, monkeypatch):
    """preprocess_runner=dataproc: on_job submits the batch request and, once it is done, publishes
    from the batch's output. The fake submit runs the request's own args through job.main
    in-process, as the batch would on Dataproc (file:// URLs of the local store for gs://)."""
    pytest.importorskip("pyspark")
    from shared.domain import events as ev
    from shared.platform.config import bootstrap
    from shared.platform.runtime import handle_message, publish_event

    from services.preprocess import dataproc, job
    from services.preprocess.service import SERVICE

    submitted = []

    class Done:
        def result(self, timeout=None):
            assert job.main(list(submitted[-1].batch.pyspark_batch.args)) == 0

    def fake_submit(settings, request, client=None):
        submitted.append(request)
        return Done()

    monkeypatch.setattr(dataproc, "submit_batch", fake_submit)
    settings = SETTINGS.model_copy(update={"profile": "local", "state_dir": tmp_path / "state", "bucket": "ftpipe",
                                           "project": "ftpipe-local", "create_resources": True})
    adapters = bootstrap(settings)
    own(adapters.docs, RECIPE)   # as the job's submission would have claimed the name
    try:
        rows = "".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} about item {i * 7}"},
                                                {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                       for i in range(12))
        adapters.store.write("ftpipe", "uploads/run-dp/chats.jsonl", rows.encode())
        publish_event(adapters.bus, ev.JobSubmitted(run_id="run-dp", recipe=RECIPE,
                                                    dataset_uri=adapters.store.url("ftpipe", "uploads/run-dp/chats.jsonl")))
        [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=2)
        assert handle_message(SERVICE, adapters, ev.JOBS, msg) == "acked"
        [request] = submitted
        assert request.batch_id == "ftpipe-prep-run-dp"
        [out] = adapters.bus.pull(ev.subscription_name("trainer", ev.DATASETS), timeout_s=2)
        prepared = ev.decode(out.data, out.attributes)
        assert isinstance(prepared, ev.DatasetPrepared) and prepared.counts["train"] > 0
        bucket, prefix = adapters.store.parse_url(prepared.dataset_uri)
        manifest = json.loads(adapters.store.read(bucket, prefix.rstrip("/") + "/manifest.json"))
        assert manifest["dataset_id"] == prepared.dataset_id and manifest["source_uri"].endswith("chats.jsonl")
    finally:
        adapters.close()
