"""Starting and cancelling runs: the one code path behind `ftpipe submit|drop|cancel` (ftpipe/client.py)
and the dashboard's `POST /api/runs` and `POST /api/runs/<id>/cancel` (services/tracker/api.py).

Every way in goes through `authorize_job` first, with the caller (shared/domain/access.py): a person
with a token or a signed-in identity, or a door (a tenant's bucket prefix or job topic) acting as a
submitter of its tenant. It checks, in order and before anything is written: the submitter role, the
tenant (one the caller submits for, which exists), the recipe (a built-in name, or a YAML file whose
differences from the defaults are judged as overrides), the overrides (shared/domain/overrides.py:
submitters change hyperparameters and tighten governance; the rest is an admin's), the model name's
policy (shared/domain/model_policy.py: the tenant must own the name; the recipe is raised to the
policy; an unclaimed name is claimed only by an admin), a gate that checks something, the memory
plan (shared/domain/memory_plan.py), and an LLM judge the deployment allows (shared/domain/judge_urls.py).

A submission then uploads the dataset under uploads/<run_id>/ and publishes JobSubmitted with the
governed recipe, the tenant and the caller as `source.by`. A drop uploads the file to
incoming/<tenant>/<recipe>/<file> (a YAML recipe to recipes/<tenant>/<name>.yaml), where the bucket's
notification starts the run through the same check, with the tenant taken from the prefix.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path, PurePosixPath

from shared.domain import events as ev, judge_urls
from shared.domain.access import Caller, require
from shared.domain.datasets import missing_prepared_files
from shared.domain.gate_rules import effective_rules
from shared.domain.memory_plan import refusal
from shared.domain.model_policy import PolicyError, claim, get_policy, govern, owner_check
from shared.domain.overrides import OverrideRefused, check_overrides
from shared.domain.recipe import Recipe, RecipeError, apply_overrides, load_recipe, parse_recipe
from shared.domain.runs import RUNS, TERMINAL
from shared.domain.tenants import DEFAULT_TENANT, TENANTS, TenantError, check_name
from shared.platform.ports import Bus, DocStore, ObjectStore
from shared.platform.runtime import CANCELLATIONS, publish_event
from shared.platform.storage import validate_object_name

CUSTOM_RECIPES = "recipes"   # recipes/<tenant>/<name>.yaml: a tenant's own recipes, for its drops
JOB_KEYS = ("recipe", "dataset", "prepared", "overrides", "tenant", "run_id")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")   # object-name and document-id safe


class JobError(ValueError):
    """A job that cannot be started or cancelled; the message says what and how to fix it. `status`
    is the HTTP status the tracker's API answers with (400 bad job, 404 no such run, 409 too late)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def resolve_recipe(ref: str) -> tuple[Recipe, bytes | None]:
    """A built-in recipe by name, or a YAML file (with its bytes, for a drop to upload)."""
    try:
        path = Path(ref)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise JobError(f"recipe file {ref} does not exist")
            return parse_recipe(path.read_text(), source=str(path)), path.read_bytes()
        return load_recipe(ref), None
    except RecipeError as exc:
        raise JobError(str(exc)) from exc


def check_custom_recipe(caller: Caller, recipe: Recipe) -> None:
    """A custom recipe is judged as overrides: its differences from the built-in of its name, or
    from the defaults for a new name (so a YAML file cannot do what an override may not)."""
    try:
        baseline = load_recipe(recipe.name)
    except RecipeError:
        baseline = Recipe(name=recipe.name, version=recipe.version, base_model=recipe.base_model,
                          model_name=recipe.model_name)
    check_overrides(caller, baseline, _diff(baseline.model_dump(mode="json"), recipe.model_dump(mode="json")))


def _diff(old: dict, new: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in new.items():
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(old.get(key), dict) and dotted != "eval.gate":
            out.update(_diff(old[key], value, dotted + "."))
        elif old.get(key) != value:
            out[dotted] = value
    return out


def job_tenant(docs: DocStore, caller: Caller, tenant: str | None) -> str:
    """The tenant a job runs for: the one named, or the caller's only one; the caller must submit
    for it and it must exist (an admin creates it: `ftpipe tenants set T`)."""
    if tenant is None:
        mine = caller.tenants("submitter")
        if mine is not None and len(mine) == 1:
            tenant = mine[0]
        elif mine is None or not mine:
            tenant = DEFAULT_TENANT
        else:
            raise JobError(f"you submit for several tenants ({', '.join(mine)}): name one (tenant: T, --tenant T)")
    try:
        check_name(tenant)
    except TenantError as exc:
        raise JobError(str(exc)) from exc
    require(caller, "submitter", tenant, to=f"submit a job for tenant {tenant}")
    if tenant != DEFAULT_TENANT and docs.get(TENANTS, tenant) is None:
        raise JobError(f"no tenant {tenant!r}; an admin creates it with `ftpipe tenants set {tenant}`", status=404)
    return tenant


def authorize_job(docs: DocStore, caller: Caller, recipe_ref: str | Recipe, overrides: dict | None = None,
                  tenant: str | None = None) -> tuple[Recipe, str]:
    """The one check behind every way in (module docstring): the governed recipe and the tenant, or
    AccessDenied / JobError saying what is refused and who may do it. `recipe_ref`: a built-in name
    or a YAML path (judged as overrides), or a Recipe a door resolved (a built-in, or the tenant's own
    from recipes/<tenant>/, judged when it was put there)."""
    require(caller, "submitter", to="submit a job")   # before anything is looked up
    tenant = job_tenant(docs, caller, tenant)
    try:
        # A Recipe object is one the door read from recipes/<tenant>/, which only this function's callers
        # write (after judging it here) and, in the cloud, only admins may write by IAM.
        base, raw = (recipe_ref, None) if isinstance(recipe_ref, Recipe) else resolve_recipe(recipe_ref)
        if raw is not None:
            check_custom_recipe(caller, base)
        check_overrides(caller, base, overrides or {})
        recipe = apply_overrides(base, overrides) if overrides else base
    except OverrideRefused as exc:
        raise JobError(str(exc), status=403) from exc
    except RecipeError as exc:
        raise JobError(str(exc)) from exc
    policy = get_policy(docs, recipe.model_name)
    try:
        if policy is None and caller.admin:
            policy = claim(docs, caller, recipe.model_name, tenant, recipe)
        owner_check(policy, recipe.model_name, tenant)
    except PolicyError as exc:
        raise JobError(str(exc), status=exc.status) from exc
    if recipe.eval.judge is not None and policy is not None and not policy.llm_judge:
        # refused here, not dropped as govern() (the doors' backstop) does: the submitter asked for a judge
        raise JobError(f"model {recipe.model_name!r}'s policy keeps probe answers in the evaluator (llm_judge: "
                       f"false): remove eval.judge, or an admin allows it with `ftpipe models policy "
                       f"{recipe.model_name} --llm-judge`", status=403)
    recipe = govern(recipe, policy)
    if not effective_rules(recipe):
        raise JobError("the recipe's gate checks nothing (every rule off and no suite on): a gate with no rules is "
                       "refused; leave a default rule on or add one under eval.gate")
    if reason := refusal(recipe):
        raise JobError(reason)
    if recipe.eval.judge is not None and (reason := judge_urls.refusal(recipe.eval.judge.base_url)):
        raise JobError(reason, status=403)
    return recipe, tenant


def check_job(job: dict) -> None:
    """The job's shape: the keys of a job file, each of the right type (JobError names the first problem)."""
    unknown = set(job) - set(JOB_KEYS)
    if unknown:
        raise JobError(f"job file: unknown keys {sorted(unknown)}; allowed: {', '.join(JOB_KEYS)}")
    for key in ("recipe", "dataset"):
        if not job.get(key):
            raise JobError(f"job file: '{key}' is required")
    for key in ("recipe", "dataset", "tenant", "run_id"):
        if key in job and not isinstance(job[key], str):
            raise JobError(f"job file: '{key}' must be a string, got {type(job[key]).__name__}")
    if "prepared" in job and not isinstance(job["prepared"], bool):
        raise JobError(f"job file: 'prepared' must be true or false, got {job['prepared']!r}")
    if not isinstance(job.get("overrides") or {}, dict):
        raise JobError("job file: 'overrides' must be a mapping of dotted keys to values, e.g. {training.epochs: 1}")
    if "run_id" in job and not _RUN_ID.fullmatch(job["run_id"]):
        raise JobError(f"job file: run_id {job['run_id']!r} must be 1-128 of A-Z a-z 0-9 . _ -, "
                       "starting with a letter or digit")
    if "tenant" in job:
        try:
            check_name(job["tenant"])
        except TenantError as exc:
            raise JobError(f"job file: {exc}") from exc


def submit(docs: DocStore, store: ObjectStore, bus: Bus, bucket: str, caller: Caller, job: dict, *,
           source: dict | None = None) -> str:
    """Publish a JobSubmitted for `caller`; returns its run id. `job`: recipe (name or YAML path),
    dataset (a local file or prepared folder, or a store URL of the tenant's), optional prepared,
    overrides, tenant, run_id. `source` (default: the dataset as given) is recorded on the run as
    where its data came from, with the caller as `by`."""
    check_job(job)
    recipe, tenant = authorize_job(docs, caller, job["recipe"], job.get("overrides"), job.get("tenant"))
    dataset = job["dataset"]
    run_id = job.get("run_id") or ev.derive_run_id("submit", recipe.hash, dataset, uuid.uuid4().hex)
    prepared = bool(job.get("prepared", False))
    if prepared and recipe.data.privacy_review and "://" not in dataset:
        raise JobError(f"recipe {recipe.name} requires a privacy sign-off (data.privacy_review): a local "
                       "prepared folder has none. Submit the raw data (dataset: the file, prepared: false) "
                       "so it is prepared and reviewed, or the store URL of a dataset already signed off")
    dataset_uri = _stage_dataset(store, bucket, dataset, run_id, prepared)
    if "://" in dataset and not caller.admin:
        check_dataset_tenant(docs, store, dataset, tenant)
    source = {**(source if source is not None else {"submitted": dataset}), "by": caller.subject}
    publish_event(bus, ev.JobSubmitted(run_id=run_id, recipe=recipe, dataset_uri=dataset_uri, prepared=prepared,
                                       tenant=tenant, source=source))
    return run_id


def check_dataset_tenant(docs: DocStore, store: ObjectStore, url: str, tenant: str) -> None:
    """A store URL a job trains on must be data of the job's tenant: under its door's prefix
    (incoming/<tenant>/), or under uploads/<run>/ or datasets/<id>/ of one of its runs."""
    _, name = store.parse_url(url)
    parts = name.split("/")
    if len(parts) > 2 and parts[0] == "incoming" and parts[1] == tenant:
        return
    if len(parts) < 2 or parts[0] not in ("uploads", "datasets"):
        raise JobError(f"dataset {url!r}: a store URL must be under incoming/{tenant}/, uploads/ or datasets/ (a "
                       "run's data); upload a local file instead", status=403)
    field = "run_id" if parts[0] == "uploads" else "dataset.id"
    runs = docs.query(RUNS, where=[(field, "==", parts[1])], limit=1)
    owner = runs[0][1].get("tenant", DEFAULT_TENANT) if runs else None
    if owner != tenant:
        raise JobError(f"dataset {url!r} is not data of tenant {tenant} (no run of {tenant} has it); submit data "
                       "you hold", status=403)


def _stage_dataset(store: ObjectStore, bucket: str, dataset: str, run_id: str, prepared: bool) -> str:
    """The store URL of the job's data: a URL as it is, a local file or prepared folder uploaded."""
    if "://" in dataset:
        try:
            validate_object_name(store.parse_url(dataset)[1].rstrip("/"))
        except ValueError as exc:  # InvalidObjectName too
            raise JobError(f"dataset {dataset!r} is not an object of this store ({exc}); give a local file or "
                           f"folder, or a URL from `ftpipe runs`/`ftpipe status` such as "
                           f"{store.url(bucket, 'datasets/')}ID/") from None
        return dataset
    path = Path(dataset)
    if prepared:
        if problem := missing_prepared_files(path):
            raise JobError(f"{dataset}: {problem}")
        from shared.platform.storage import upload_dir
        upload_dir(store, path, bucket, f"uploads/{run_id}/dataset")
        return store.url(bucket, f"uploads/{run_id}/dataset/")
    if not path.is_file():
        raise JobError(f"{dataset}: no such file")
    name = f"uploads/{run_id}/{safe_name(path.name)}"
    store.upload_file(bucket, name, str(path))
    return store.url(bucket, name)


def drop(docs: DocStore, store: ObjectStore, bucket: str, caller: Caller, file: str | Path, recipe: str, *,
         tenant: str | None = None, legal_basis: str | None = None) -> str:
    """Upload a dataset to incoming/<tenant>/<recipe>/<file>, as a team would drop it into its prefix
    of the bucket (checked first as the drop's door will check it). Returns the run id the drop
    starts (derived exactly as the preprocess service derives it). A YAML recipe goes to
    recipes/<tenant>/<name>.yaml, where that tenant's drops find it. `legal_basis` (a legal basis /
    consent reference) is written first, as the sidecar object <drop>.legal.json that the preprocess
    service reads with the drop."""
    path = Path(file)
    if not path.is_file():
        raise JobError(f"{file}: no such file")
    parsed, tenant = authorize_job(docs, caller, recipe, tenant=tenant)
    # ...and as the drop's door will check it (it acts as a submitter of the tenant, whoever dropped).
    base, raw = resolve_recipe(recipe)
    authorize_job(docs, Caller.for_door(tenant, f"incoming/{tenant}/"), base, tenant=tenant)
    if raw is not None:
        store.write(bucket, f"{CUSTOM_RECIPES}/{tenant}/{parsed.name}.yaml", raw)
    name = f"incoming/{tenant}/{parsed.name}/{safe_name(path.name)}"
    if legal_basis is not None:
        if not legal_basis.strip():
            raise JobError("--legal-basis must not be empty")
        store.write(bucket, f"{name}.legal.json",
                    json.dumps({"legal_basis": legal_basis.strip(), "at": time.time()}).encode(),
                    content_type="application/json")
    info = store.upload_file(bucket, name, str(path))
    return ev.derive_run_id(info.bucket, info.name, str(info.generation), parsed.name, parsed.version)


def cancel(docs: DocStore, caller: Caller, run_id: str) -> dict:
    """Set the run's cancel flag (every service checks it before its work, the trainer at each step)
    and mark the run cancelled; returns the run document. A submitter of the run's tenant may."""
    require(caller, "submitter", to=f"cancel run {run_id}")
    run = docs.get(RUNS, run_id)
    if run is None:
        raise JobError(f"no run {run_id}; `ftpipe runs` lists them", status=404)
    require(caller, "submitter", run.get("tenant", DEFAULT_TENANT), to=f"cancel run {run_id}")
    if run.get("status") in TERMINAL:
        raise JobError(f"run {run_id} already ended ({run['status']})", status=409)
    docs.set(CANCELLATIONS, run_id, {"requested_at": time.time()})

    from shared.domain.tenant_stats import apply_change

    def mark(txn):
        doc = txn.get(RUNS, run_id)
        if doc.get("status") not in TERMINAL:
            before = dict(doc)
            doc.update(status="cancelled", sub_state="done", error="cancelled by request")
            apply_change(txn, before, doc)
            txn.set(RUNS, run_id, doc)
        return doc
    return docs.transaction(mark)


def mark_replayed(docs: DocStore, run_id: str, message_id: str) -> None:
    """`ftpipe dlq replay` of a message of this run: a run the dead letter had failed is back in the
    state it was in, and a notice of that message the tracker has not folded yet will not fail it."""
    from shared.domain.tenant_stats import apply_change

    def mark(txn):
        run = txn.get(RUNS, run_id)
        if run is None:
            return
        before = {**run}
        dead_letter = run.setdefault("dead_letter", {})
        dead_letter.setdefault("replayed", {})[message_id] = time.time()
        if dead_letter.get("active") and dead_letter.get("message_id") == message_id:
            run.update(status=dead_letter.get("previous_status", "running"), error=None)
            dead_letter["active"] = False
        apply_change(txn, before, run)
        txn.set(RUNS, run_id, run)
    docs.transaction(mark)


def safe_name(filename: str) -> str:
    """A file name usable as the last part of an object name (no folders, no odd characters)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    if not name:
        raise JobError(f"{filename!r} has no usable file name")
    return name
