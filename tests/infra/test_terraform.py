"""infra/terraform against the code: every topic, subscription, filter, retry and dead-letter
setting, bucket, bucket notification, Firestore index, GPU pool and service environment the code
relies on is declared there, and nothing the code does not use. The code's side is derived from the
modules that define it (shared/domain/events.py, shared/platform/topology.py, shared/platform/config.py, ...), never copied.

Also `terraform fmt -check` and checkov, from the tools `make setup` installs into .venv-infra."""
from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is a test dependency: make setup installs it")

from shared.domain import events as ev
from shared.domain.jobs import RUNS
from shared.domain.recipe import GKE_ACCELERATORS, HardwareSpec, available_recipes, load_recipe
from shared.platform.config import Settings
from shared.platform.notifications import INCOMING_PREFIX
from shared.platform.scheduling import CLASSES
from shared.platform.topology import (
    DOCS_READERS,
    DOOR_SERVICE,
    PRIORITIZED,
    SERVICE_PUBLISHES,
    SERVICE_TOPICS,
    STORE_READERS,
    dlq_subscription,
    ledger_database_for,
    may_publish,
    publish_topics,
    subscriptions,
)

from services.tracker import api as tracker_api
from services.tracker.lineage import METRICS, RUN_EVENTS

ROOT = Path(__file__).resolve().parents[2]
TF = ROOT / "infra" / "terraform"
INFRA_BIN = ROOT / ".venv-infra" / "bin"

# How each service takes its topics in the cloud (the rest pull): the evaluator by push on Cloud
# Run (services/evaluator/app.py), the registry by its function's Eventarc trigger (functions.tf).
PUSH = {"evaluator"}
EVENT_TRIGGERED = {"registry"}


def _load(path: Path) -> dict:
    options = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    with open(path) as fh:
        return hcl2.load(fh, serialization_options=options)


@pytest.fixture(scope="module")
def tf() -> dict:
    """Every block of every .tf file, merged: {"resource": {type: {name: body}}, "locals": {...}, ...}."""
    merged: dict = {"resource": {}, "locals": {}, "variable": {}, "data": {}, "output": {}}
    for path in sorted(TF.glob("*.tf")):
        doc = _load(path)
        for block in doc.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    merged["resource"].setdefault(rtype, {})[name] = body
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        for kind in ("variable", "data", "output"):
            for block in doc.get(kind, []):
                merged[kind].update(block)
    return merged


def _one(body, key):
    """A nested block's body (the parser gives a list of one)."""
    value = body[key]
    return value[0] if isinstance(value, list) else value


def _resource(tf, rtype: str, name: str) -> dict:
    assert name in tf["resource"].get(rtype, {}), f"infra/terraform declares no {rtype}.{name}"
    return tf["resource"][rtype][name]


# ------------------------------------------------------------------ the code's side

def code_pull_subscriptions() -> dict[str, tuple[str, str, str]]:
    """subscription -> (service, topic, filter expression) for the services that pull in the cloud."""
    return {name: (service, topic, flt.expression() if flt else "")
            for service, topics in SERVICE_TOPICS.items() if service not in PUSH | EVENT_TRIGGERED
            for topic in topics for name, flt in subscriptions(service, topic)}


def code_other_subscriptions(kind: set[str]) -> dict[str, tuple[str, str]]:
    return {ev.subscription_name(service, topic): (service, topic)
            for service, topics in SERVICE_TOPICS.items() if service in kind for topic in topics}


# What each service's code publishes: the event classes it constructs (`ev.X(...)`), itself or in
# the shared functions it reaches (jobs.submit, privacy.approve, model_registry's operations, the
# runtime's dead_letter), found by reading the code. A function counts with everything it constructs
# and calls (nested functions included), so this errs towards more, never fewer.
SERVICE_FOLDERS = {"registry": "registry_fn"}  # services/<folder> of a service named otherwise
EVENTS_MODULE = "shared.domain.events"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


class _Module:
    """One module's functions (qualified names: `f`, `Class.method`; a class's name stands for the
    whole class, which constructing it may run) and, for each, the event classes it constructs and
    the functions it refers to."""

    def __init__(self, path: Path, modules: set[str]):
        self.name = _module_name(path)
        self.tree = ast.parse(path.read_text())
        self.imports: dict[str, tuple[str, str | None]] = {}  # local name -> (module, symbol or None)
        for node in ast.walk(self.tree):  # a function's own imports too
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    self.imports[a.asname or a.name] = (full, None) if full in modules else (node.module, a.name)
        self.functions: dict[str, ast.AST] = {}
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.functions[node.name] = node  # constructing it runs its __init__: the class as a whole
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.functions[f"{node.name}.{item.name}"] = item

    def facts(self, node: ast.AST, cls: str | None) -> tuple[set[str], set[tuple[str, str]]]:
        """(event classes constructed, (module, function) referred to) within `node`."""
        events, refs = set(), set()
        instances = {t.id: n.value.func.id for n in ast.walk(node) if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name)
                     and n.value.func.id in self.functions for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(node):
            if isinstance(n, ast.Call) and (target := self._event(n.func)):
                events.add(target)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                if n.id in self.functions:
                    refs.add((self.name, n.id))
                elif n.id in self.imports and self.imports[n.id][1] is not None:
                    refs.add((self.imports[n.id][0], str(self.imports[n.id][1])))
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                owner = n.value.id
                if owner in self.imports and self.imports[owner][1] is None:
                    refs.add((self.imports[owner][0], n.attr))
                elif owner in ("self", "cls") and cls:
                    refs.add((self.name, f"{cls}.{n.attr}"))
                elif owner in instances:
                    refs.add((self.name, f"{instances[owner]}.{n.attr}"))
        return events, refs

    def _event(self, func: ast.AST) -> str | None:
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and self.imports.get(func.value.id) == (EVENTS_MODULE, None) and func.attr in ev.EVENT_TYPES):
            return func.attr
        if isinstance(func, ast.Name) and self.imports.get(func.id, ("", None))[0] == EVENTS_MODULE:
            name = self.imports[func.id][1]
            return name if name in ev.EVENT_TYPES else None
        return None


def code_publishes() -> dict[str, set[str]]:
    """service -> the event classes its code constructs, directly or through what it calls."""
    paths = [p for folder in ("shared", "services") for p in (ROOT / folder).rglob("*.py")]
    names = {_module_name(p) for p in paths}
    modules = {m.name: m for m in (_Module(p, names) for p in paths)}
    facts: dict[tuple[str, str], tuple[set[str], set[tuple[str, str]]]] = {}
    for m in modules.values():
        for qualname, node in m.functions.items():
            facts[(m.name, qualname)] = m.facts(node, qualname.split(".")[0] if isinstance(node, ast.FunctionDef)
                                                 and "." in qualname else None)

    def reach(start: set[tuple[str, str]]) -> set[str]:
        seen, todo, events = set(), list(start), set()
        while todo:
            key = todo.pop()
            if key in seen or key not in facts:
                continue
            seen.add(key)
            found, refs = facts[key]
            events |= found
            todo += refs
        return events

    out = {}
    for service in SERVICE_PUBLISHES:
        folder = ROOT / "services" / SERVICE_FOLDERS.get(service, service)
        events, refs = set(), set()
        for path in folder.rglob("*.py"):  # the whole of a service's own code
            found, found_refs = modules[_module_name(path)].facts(modules[_module_name(path)].tree, None)
            events |= found
            refs |= found_refs
        out[service] = events | reach(refs)
    return out


def test_each_service_declares_exactly_the_events_its_code_publishes():
    """SERVICE_PUBLISHES (the runtime's publish guard, and below the IAM grants) against the code:
    a service that starts publishing a new event fails here until it is declared, and a declaration
    no code needs fails until it is removed. MessageDeadLettered comes with consuming (the runtime)."""
    derived = code_publishes()
    for service in SERVICE_PUBLISHES:
        declared = {cls.__name__ for cls in may_publish(service)}
        code = derived[service] | ({"MessageDeadLettered"} if SERVICE_TOPICS.get(service) else set())
        assert code == declared, (f"{service}: the code publishes {sorted(code - declared)} undeclared, and "
                                  f"{sorted(declared - code)} declared is published by no code of it")
    assert SERVICE_PUBLISHES["serving"] == ()  # it only reads the registry


def test_the_derivation_sees_the_shared_functions_a_service_calls():
    # (a guard on the reader above) the tracker publishes only through shared functions, and the
    # registry's operations build their events in a class's methods
    derived = code_publishes()
    assert {"JobSubmitted", "DatasetPrepared", "DatasetRejected", "ModelApproved", "ModelPromoted"} <= derived["tracker"]
    assert {"ModelRegistered", "ModelQuarantined", "ModelArchived"} <= derived["registry"]
    assert "MessageDeadLettered" in derived["registry"]  # main.py dead-letters an undecodable push itself


# ------------------------------------------------------------------ topics and subscriptions

def test_topics_and_dead_letter_topics_are_the_codes(tf):
    declared = tf["locals"]["topics"]
    assert list(declared) == list(ev.TOPICS)
    for topic, spec in declared.items():
        assert spec["dead_letter"] == ev.dead_letter_topic(topic)
        assert spec["dlq_subscription"] == dlq_subscription(topic)  # what `ftpipe dlq` reads
    topics = _resource(tf, "google_pubsub_topic", "topics")
    dead = _resource(tf, "google_pubsub_topic", "dead_letter")
    dlq = _resource(tf, "google_pubsub_subscription", "dlq")
    assert (topics["for_each"], topics["name"]) == ("${local.all_topics}", "${each.key}")
    assert (dead["for_each"], dead["name"]) == ("${local.all_topics}", "${each.value.dead_letter}")
    assert (dlq["for_each"], dlq["name"]) == ("${local.all_topics}", "${each.value.dlq_subscription}")
    assert dlq["topic"] == "${google_pubsub_topic.dead_letter[each.key].id}"
    assert set(tf["resource"]["google_pubsub_topic"]) == {"topics", "dead_letter"}   # the doors among them


def test_every_subscription_the_code_uses_is_declared_and_no_other(tf):
    pulls = {name: (s["service"], s["topic"], s["filter"]) for name, s in tf["locals"]["pull_subscriptions"].items()}
    assert pulls == code_pull_subscriptions()
    pushes = {name: (s["service"], s["topic"]) for name, s in tf["locals"]["push_subscriptions"].items()}
    assert pushes == code_other_subscriptions(PUSH)
    triggers = {name: (s["service"], s["topic"]) for name, s in tf["locals"]["event_triggers"].items()}
    assert triggers == code_other_subscriptions(EVENT_TRIGGERED)
    # the resources iterate over exactly those tables
    assert set(tf["resource"]["google_pubsub_subscription"]) == {"dlq", "pull", "push"}
    for name, table in (("pull", "all_pull_subscriptions"), ("push", "push_subscriptions")):   # doors: with pull
        sub = _resource(tf, "google_pubsub_subscription", name)
        assert (sub["for_each"], sub["name"]) == (f"${{local.{table}}}", "${each.key}")
        assert sub["topic"] == "${google_pubsub_topic.topics[each.value.topic].id}"
    assert _resource(tf, "google_pubsub_subscription", "pull")["filter"] == "${each.value.filter}"
    trigger = _one(_resource(tf, "google_cloudfunctions2_function", "registry"), "event_trigger")
    assert trigger["pubsub_topic"] == '${google_pubsub_topic.topics[local.event_triggers["registry.evaluations"].topic].id}'
    assert trigger["event_type"] == "google.cloud.pubsub.topic.v1.messagePublished"


def test_priority_subscriptions_cover_every_class():
    # What the table above must contain for the trainer (a guard on the derivation itself).
    names = set(code_pull_subscriptions())
    for service in PRIORITIZED:
        for topic in SERVICE_TOPICS[service]:
            assert {f"{service}.{topic}.{c}" for c in CLASSES[:-1]} | {f"{service}.{topic}"} <= names


def _duration_s(text: str) -> float:
    assert text.endswith("s"), text
    return float(text[:-1])


def test_pull_subscriptions_have_the_runtimes_policy(tf):
    policy = Settings().subscription_policy()
    declared = tf["locals"]["subscription_policy"]
    assert declared["ack_deadline_seconds"] == policy.ack_deadline_s
    assert _duration_s(declared["message_retention_duration"]) == policy.retention_s
    assert _duration_s(declared["minimum_backoff"]) == policy.min_backoff_s
    assert _duration_s(declared["maximum_backoff"]) == policy.max_backoff_s
    assert tf["variable"]["max_delivery_attempts"]["default"] == policy.max_delivery_attempts
    sub = _resource(tf, "google_pubsub_subscription", "pull")
    assert _one(sub, "dead_letter_policy") == {
        "dead_letter_topic": "${google_pubsub_topic.dead_letter[each.value.topic].id}",
        "max_delivery_attempts": "${var.max_delivery_attempts}"}
    # the label the Pub/Sub adapter reads to dead-letter with a reason
    from shared.platform.adapters.pubsub import MAX_ATTEMPTS_LABEL
    assert tf["locals"]["max_attempts_label"] == MAX_ATTEMPTS_LABEL
    assert sub["labels"] == {"${(local.max_attempts_label)}": "${tostring(var.max_delivery_attempts)}"}
    assert _one(sub, "expiration_policy") == {"ttl": ""}


def test_the_evaluators_push_subscription_matches_its_app(tf):
    sub = _resource(tf, "google_pubsub_subscription", "push")
    push = _one(sub, "push_config")
    assert push["push_endpoint"] == "${google_cloud_run_v2_service.evaluator.uri}/pubsub/push"  # app.py's route
    oidc = _one(push, "oidc_token")
    assert oidc == {"service_account_email": '${google_service_account.sa["push"].email}',
                    "audience": "${local.evaluator_push_audience}"}
    assert tf["locals"]["push_policy"]["ack_deadline_seconds"] == 600  # Pub/Sub's most: see app.py
    assert _one(sub, "dead_letter_policy")["max_delivery_attempts"] == "${var.evaluator_max_delivery_attempts}"
    # The service checks what the subscription signs, retries as often and renews its claim
    # against the same deadline.
    evaluator = _resource(tf, "google_cloud_run_v2_service", "evaluator")
    env = _env(tf, "evaluator")
    assert env["FTPIPE_PUSH_AUDIENCE"] == "${local.evaluator_push_audience}"
    assert env["FTPIPE_PUSH_SERVICE_ACCOUNT"] == '${google_service_account.sa["push"].email}'
    assert env["FTPIPE_MAX_DELIVERY_ATTEMPTS"] == "${tostring(var.evaluator_max_delivery_attempts)}"
    assert env["FTPIPE_ACK_DEADLINE_S"] == "${tostring(local.push_policy.ack_deadline_seconds)}"
    assert evaluator["custom_audiences"] == ["${local.evaluator_push_audience}"]
    assert _one(evaluator, "template")["max_instance_request_concurrency"] == 1


def test_the_pubsub_agent_may_dead_letter(tf):
    grants = tf["resource"]["google_pubsub_topic_iam_member"]
    assert grants["agent_publishes_dead_letters"]["topic"] == "${google_pubsub_topic.dead_letter[each.key].id}"
    assert grants["agent_publishes_dead_letters"]["for_each"] == "${local.all_topics}"
    subs = tf["resource"]["google_pubsub_subscription_iam_member"]
    assert subs["agent_subscribes_pull"]["for_each"] == "${local.all_pull_subscriptions}"
    assert subs["agent_subscribes_push"]["for_each"] == "${local.push_subscriptions}"


def test_each_service_may_pull_its_subscriptions_and_dead_letter_what_it_consumes(tf):
    consumes = {service: list(topics) for service, topics in tf["locals"]["consumes"].items()}
    assert consumes == {service: list(topics) for service, topics in SERVICE_TOPICS.items()}
    pulls = tf["resource"]["google_pubsub_subscription_iam_member"]["pulls"]
    assert (pulls["for_each"], pulls["member"]) == ("${local.all_pull_subscriptions}", "${local.sa_member[each.value.service]}")
    assert set(tf["locals"]["service_accounts"]) >= set(SERVICE_TOPICS)
    dead = tf["resource"]["google_pubsub_topic_iam_member"]["dead_letters"]
    assert (dead["for_each"], dead["topic"], dead["role"], dead["member"]) == (
        "${local.dead_letter_grants}", "${google_pubsub_topic.dead_letter[each.value.topic].id}",
        "roles/pubsub.publisher", "${local.sa_member[each.value.service]}")


def test_each_service_may_publish_on_the_topics_of_its_events_and_no_other(tf):
    """The publish grants are the topics of what each service's code publishes (SERVICE_PUBLISHES,
    checked against the code above), plus `notices` for every consumer (the runtime's
    MessageDeadLettered), and nothing else."""
    assert tf["locals"]["publishes"] == {service: list(publish_topics(service)) for service in SERVICE_PUBLISHES}
    grants = tf["resource"]["google_pubsub_topic_iam_member"]
    # (the others: Pub/Sub's agent on the dead-letter topics, GCS's on dataset-uploads)
    assert set(grants) == {"publishes", "notices", "dead_letters", "agent_publishes_dead_letters", "gcs_publishes_uploads",
                           "door_publishers"}   # a tenant's principals on its job door
    own = grants["publishes"]
    assert (own["for_each"], own["topic"], own["role"], own["member"]) == (
        "${local.publish_grants}", "${google_pubsub_topic.topics[each.value.topic].id}", "roles/pubsub.publisher",
        "${local.sa_member[each.value.service]}")
    notices = grants["notices"]
    assert ev.MessageDeadLettered.topic == ev.NOTICES and set(tf["locals"]["consumes"]) == set(SERVICE_TOPICS)
    assert (notices["for_each"], notices["topic"], notices["role"], notices["member"]) == (
        "${local.consumes}", f'${{google_pubsub_topic.topics["{ev.NOTICES}"].id}}', "roles/pubsub.publisher",
        "${local.sa_member[each.key]}")
    # serving publishes nothing of its own: no right on `jobs` (or any work topic) at all
    assert tf["locals"]["publishes"]["serving"] == []
    # and `notices` is the tracker's alone to read
    readers = {s["service"] for s in tf["locals"]["pull_subscriptions"].values() if s["topic"] == ev.NOTICES}
    assert readers == {"tracker"}


# ------------------------------------------------------------------ bucket

def test_the_one_bucket_the_code_uses_is_declared(tf):
    buckets = tf["resource"]["google_storage_bucket"]
    assert set(buckets) == {"data"}  # Settings.bucket: the only bucket the code names
    data = buckets["data"]
    assert data["name"] == "${var.bucket}"
    assert data["uniform_bucket_level_access"] is True and data["public_access_prevention"] == "enforced"
    assert _one(data, "versioning") == {"enabled": True}
    rules = data["lifecycle_rule"]
    conditions = [_one(r, "condition") for r in rules]
    # checkpoints: pruned versions go, and old checkpoints lose their resume state
    assert {"matches_prefix": ["runs/"], "days_since_noncurrent_time": 1, "with_state": "ARCHIVED"} in conditions
    assert any(c.get("matches_suffix") == [".pt"] and c.get("matches_prefix") == ["runs/"] for c in conditions)
    assert any(_one(r, "action").get("storage_class") == "ARCHIVE" for r in rules)
    # every Terraform-managed bucket in the services' environment is this one
    assert tf["locals"]["common_env"]["FTPIPE_BUCKET"] == "${google_storage_bucket.data.name}"


def test_bucket_roles_follow_what_each_service_does_with_the_objects(tf):
    """objectUser for the services that write the bucket; objectViewer for the STORE_READERS, whose
    store is read-only in the code too (shared/platform/topology.py store_reading_only)."""
    grants = tf["resource"]["google_storage_bucket_iam_member"]
    assert (grants["data"]["for_each"], grants["data"]["role"]) == ("${toset(local.data_services)}", "roles/storage.objectUser")
    assert (grants["reads"]["for_each"], grants["reads"]["role"]) == ("${toset(local.store_readers)}",
                                                                      "roles/storage.objectViewer")
    assert tf["locals"]["store_readers"] == list(STORE_READERS)
    assert not set(STORE_READERS) & set(tf["locals"]["data_services"])


def test_checkpoint_resume_state_is_the_only_pt_the_trainer_writes():
    """The .pt lifecycle rule deletes only a checkpoint's resume state: every torch.save of the
    trainer to a file is in the function that writes a checkpoint."""
    savers = set()
    for path in (ROOT / "services" / "trainer").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and any(
                    isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "save"
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
                    and isinstance(n.args[1], ast.BinOp) for n in ast.walk(fn)):  # to `folder / "x.pt"`
                savers.add(f"{path.name}:{fn.name}")
    assert savers == {"training.py:_save_checkpoint"}


def test_drops_under_incoming_are_announced_on_dataset_uploads(tf):
    note = _resource(tf, "google_storage_notification", "incoming")
    assert note["object_name_prefix"] == INCOMING_PREFIX
    assert note["topic"] == f'${{google_pubsub_topic.topics["{ev.DATASET_UPLOADS}"].id}}'
    assert note["payload_format"] == "JSON_API_V1" and note["event_types"] == ["OBJECT_FINALIZE"]


# ------------------------------------------------------------------ Firestore

def _query_sites() -> set[tuple[str, str]]:
    """(file, innermost function) of every DocStore query in the code with both a filter and an order."""
    sites = set()

    class Visitor(ast.NodeVisitor):
        def __init__(self, path: str):
            self.path, self.function = path, "<module>"

        def visit_FunctionDef(self, node):
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        def visit_Call(self, node):
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "query"
                    and {"where", "order_by"} <= {k.arg for k in node.keywords}):
                sites.add((self.path, self.function))
            self.generic_visit(node)

    for folder in ("services", "shared", "ftpipe"):
        for path in (ROOT / folder).rglob("*.py"):
            Visitor(path.relative_to(ROOT).as_posix()).visit(ast.parse(path.read_text()))
    return sites


def test_no_query_of_the_code_needs_an_index_not_declared(tf):
    # A new filtered and ordered query fails here until its composite index is added to firestore.tf.
    assert _query_sites() == {
        ("services/tracker/api.py", "query_runs"),      # RUN_FILTERS x RUN_ORDER and metric orders
        ("services/tracker/api.py", "metric_rows"),     # metrics: run_id == , step >, order step
        ("services/tracker/api.py", "run"),             # run_events: run_id ==, order seq
        ("services/tracker/api.py", "run_events"),      # run_events: run_id ==, seq >, order seq
        ("ftpipe/client.py", "runs"),                   # runs: status ==, order created_at desc
    }
    assert RUNS == "runs" and METRICS == "metrics" and RUN_EVENTS == "run_events"
    assert tf["locals"]["run_filters"] == [field for _, field in tracker_api.RUN_FILTERS]
    assert tf["locals"]["run_orders"] == f"${{concat({json.dumps(list(tracker_api.RUN_ORDER))}, var.firestore_run_metric_orders)}}"
    for metric in tf["variable"]["firestore_run_metric_orders"]["default"]:
        assert tracker_api._METRIC_ORDER.fullmatch(metric), metric
    indexes = tf["locals"]["firestore_indexes"]
    assert "setproduct(local.run_filters, local.run_orders" in json.dumps(indexes)
    assert "DESCENDING" in json.dumps(indexes)  # both directions: the API orders either way
    index = _resource(tf, "google_firestore_index", "composite")
    assert index["for_each"] == "${local.firestore_indexes}"


def test_the_firestore_database_is_the_default_one(tf):
    db = _resource(tf, "google_firestore_database", "default")
    assert db["name"] == "(default)" and db["type"] == "FIRESTORE_NATIVE"  # firestore.Client(project)
    # and the ledgers of the services that only read it, each a database of its own
    assert set(tf["resource"]["google_firestore_database"]) == {"default", "ledger"}
    ledger = _resource(tf, "google_firestore_database", "ledger")
    assert ledger["for_each"] == "${toset(local.docs_readers)}" and ledger["type"] == "FIRESTORE_NATIVE"
    assert tf["locals"]["docs_readers"] == list(DOCS_READERS)
    assert all(ledger["name"].replace("${each.key}", s) == ledger_database_for(s) for s in DOCS_READERS)


def test_firestore_roles_follow_what_each_service_does_with_the_documents(tf):
    """Read-write on (default) for the services that write it; the DOCS_READERS (serving: its code's
    documents are read-only, shared/platform/topology.py reading_only) hold no project-wide Firestore
    role: datastore.viewer on (default) and datastore.user on their ledger's database, each by an IAM
    condition on the database's resource name, and their environment names that database."""
    project_roles = tf["resource"]["google_project_iam_member"]
    writers = project_roles["firestore"]
    assert writers["role"] == "roles/datastore.user" and "condition" not in writers
    assert writers["for_each"] == '${toset([for s in local.data_services : s if s != "dataproc"])}'
    assert not set(DOCS_READERS) & set(tf["locals"]["data_services"])
    reads, ledger = project_roles["firestore_reads"], project_roles["ledger"]
    database = 'resource.name == "projects/${var.project}/databases/${google_firestore_database.%s.name}"'
    assert (reads["for_each"], reads["role"], _one(reads, "condition")["expression"]) == (
        "${toset(local.docs_readers)}", "roles/datastore.viewer", database % "default")
    assert (ledger["for_each"], ledger["role"], _one(ledger, "condition")["expression"]) == (
        "${toset(local.docs_readers)}", "roles/datastore.user", database % "ledger[each.key]")
    # and no other project-level grant names them (serving's only project-level roles are those two)
    for name, grant in project_roles.items():
        if name not in ("firestore_reads", "ledger"):
            assert not any(s in json.dumps(grant) for s in (*DOCS_READERS, "docs_readers")), name
    serving_env = tf["output"]["serving_env"]["value"]
    assert 'FTPIPE_LEDGER_DATABASE = google_firestore_database.ledger["serving"].name' in serving_env
    assert 'FTPIPE_SERVING_CALLERS = join(",", var.serving_callers)' in serving_env


# ------------------------------------------------------------------ GKE

@pytest.mark.parametrize("env", ["dev", "prod"])
def test_gpu_pools_are_named_as_recipes_resolve_them(env):
    tfvars = _load(TF / "envs" / f"{env}.tfvars")
    pools = tfvars["gpu_pools"]
    for name, pool in pools.items():
        hardware = HardwareSpec(gpu=pool["gpu"], spot=pool["spot"])
        assert name == hardware.pool, f"{env}: pool {name!r} is what no recipe selects; {pool['gpu']} spot={pool['spot']} is {hardware.pool!r}"
        assert pool["accelerator"] == GKE_ACCELERATORS[pool["gpu"]]
    for recipe in available_recipes():  # every shipped recipe finds its pool
        assert load_recipe(recipe).hardware.pool in pools, f"{env}: no pool for recipe {recipe}"


def test_gpu_pools_scale_from_zero_with_the_taints_the_job_tolerates(tf):
    pool = _resource(tf, "google_container_node_pool", "gpu")
    assert pool["name"] == "${each.key}" and pool["initial_node_count"] == 0
    assert _one(pool, "autoscaling")["total_min_node_count"] == 0
    node = _one(pool, "node_config")
    assert node["spot"] == "${each.value.spot}"
    taint = _one(_one(node, "dynamic"), "taint")
    content = _one(taint, "content")
    from services.trainer.k8s import render
    job = render(load_recipe("tiny-sft"), "run-1", "gs://b/d/", image="i")
    tolerations = job["spec"]["template"]["spec"]["tolerations"]
    assert {"key": content["key"], "operator": "Equal", "value": content["value"], "effect": "NoSchedule"} in tolerations
    assert _one(_one(tf["resource"]["google_container_cluster"]["main"], "workload_identity_config"), "workload_pool")


# ------------------------------------------------------------------ the services' environment

def _env(tf, service: str) -> dict:
    """A Cloud Run service's environment: local.common_env and its own map, as its container uses them."""
    resource = _resource(tf, "google_cloud_run_v2_service", service)
    env = _one(_one(_one(_one(resource, "template"), "containers"), "dynamic"), "env")
    assert env["for_each"] == f"${{merge(local.common_env, local.{service}_env)}}"
    return {**tf["locals"]["common_env"], **tf["locals"][f"{service}_env"]}


def _settings_env_names() -> set[str]:
    """Every FTPIPE_* variable the code reads."""
    names = set()
    for folder in ("shared", "services", "ftpipe"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r'"(FTPIPE_[A-Z_]+)"', path.read_text()))
    return names


def test_every_variable_terraform_sets_is_one_the_code_reads(tf):
    text = "\n".join(p.read_text() for p in TF.glob("*.tf"))
    set_there = set(re.findall(r"\b(FTPIPE_[A-Z_]+)\s*=", text))
    assert set_there, "no FTPIPE_ settings found in infra/terraform"
    unknown = set_there - _settings_env_names()
    assert not unknown, f"infra/terraform sets variables no code reads: {sorted(unknown)}"
    # and the settings the cloud needs are there
    assert {"FTPIPE_PROFILE", "FTPIPE_PROJECT", "FTPIPE_BUCKET", "FTPIPE_PUSH_AUDIENCE", "FTPIPE_DASHBOARD_AUDIENCE",
            "FTPIPE_APPROVAL_AUDIENCE", "FTPIPE_ADMINS", "FTPIPE_SERVING_CALLERS", "FTPIPE_PREPROCESS_RUNNER", "FTPIPE_DATAPROC_WHEEL_URI",
            "FTPIPE_DATAPROC_MAIN_URI", "FTPIPE_DATAPROC_SERVICE_ACCOUNT"} <= set_there
    assert tf["locals"]["common_env"]["FTPIPE_PROFILE"] == "gcp"


def test_the_settings_terraform_gives_are_valid_settings(tf, monkeypatch):
    """The literal values of the services' environment parse as Settings (shared/platform/config.py)."""
    env = {k: v for k, v in {**tf["locals"]["common_env"], **tf["locals"]["dataproc_env"]}.items() if "${" not in str(v)}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("FTPIPE_PROJECT", "p")
    settings = Settings.from_env()
    assert settings.profile == "gcp" and settings.preprocess_runner == "dataproc" and settings.verify_push
    assert not settings.create_resources  # Terraform owns topics, subscriptions and the bucket


def test_the_tracker_is_behind_iap_with_the_audience_it_checks(tf):
    tracker = _resource(tf, "google_cloud_run_v2_service", "tracker")
    assert tracker["ingress"] == "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
    env = _env(tf, "tracker")
    assert env["FTPIPE_DASHBOARD_AUDIENCE"] == "${local.dashboard_audience}"
    assert tf["locals"]["dashboard_audience"].startswith("/projects/${data.google_project.this.number}/global/backendServices/")
    backend = _resource(tf, "google_compute_backend_service", "tracker")
    assert _one(backend, "iap")["enabled"] is True


def test_the_registry_functions_run_the_entry_points_of_their_source(tf):
    from services.registry_fn import main
    for name, entry in (("registry", "on_evaluation"), ("approve", "approve")):
        fn = _resource(tf, "google_cloudfunctions2_function", name)
        build = _one(fn, "build_config")
        assert build["entry_point"] == entry and callable(getattr(main, entry))
        assert build["runtime"] == "python311"
        assert _one(fn, "service_config")["environment_variables"] == "${merge(local.common_env, local.registry_env)}"
    assert set(tf["locals"]["registry_env"]) == {"FTPIPE_APPROVAL_AUDIENCE"}   # roles decide, not a list
    assert tf["locals"]["common_env"]["FTPIPE_ADMINS"] == '${join(",", var.admins)}'


def test_a_tenants_job_door_is_its_topic_with_only_its_publishers(tf):
    """job-requests.<tenant>: a topic like the others, with the names the code derives (ev.door_topic,
    dead_letter_topic, dlq_subscription, subscription_name of the door service), and publish rights for
    the tenant's own principals only (Pub/Sub does not say who published: the topic does)."""
    topic = ev.door_topic("${tenant}")
    topics, subscriptions = tf["locals"]["all_topics"], tf["locals"]["all_pull_subscriptions"]
    assert topics.startswith("${merge(local.topics, ") and subscriptions.startswith("${merge(local.pull_subscriptions, ")
    assert f'"{topic}" => {{dead_letter = "{ev.dead_letter_topic(topic)}", dlq_subscription = ' \
           f'"{dlq_subscription(topic)}"}}' in topics
    assert f'"{ev.subscription_name(DOOR_SERVICE, topic)}" => {{service = "{DOOR_SERVICE}", topic = "{topic}"' \
           in subscriptions
    assert f'"{DOOR_SERVICE}:{topic}" => {{service = "{DOOR_SERVICE}", topic = "{topic}"}}' \
           in tf["locals"]["dead_letter_grants"]   # preprocess dead-letters what it takes from a door
    publishers = _resource(tf, "google_pubsub_topic_iam_member", "door_publishers")
    assert (publishers["topic"], publishers["member"]) == (
        '${google_pubsub_topic.topics["' + ev.door_topic("${each.value.tenant}") + '"].id}', "${each.value.member}")
    assert tf["locals"]["common_env"]["FTPIPE_JOB_DOORS"] == '${join(",", keys(local.doors))}'


def test_a_tenants_door_is_its_prefix_and_nothing_else(tf):
    """Drops have no verified caller: IAM is what binds incoming/<tenant>/ to the tenant's principals
    (services/preprocess/service.py on_upload then acts as a submitter of that tenant)."""
    door = _resource(tf, "google_storage_bucket_iam_member", "tenant_doors")
    assert door["role"] == "roles/storage.objectCreator"   # create only: no reading others' drops, no recipes/
    expression = _one(door, "condition")["expression"]
    assert expression == ('resource.name.startsWith("projects/_/buckets/${google_storage_bucket.data.name}'
                          '/objects/incoming/${each.value.tenant}/")')


# ------------------------------------------------------------------ tools

def _tool(name: str) -> Path:
    path = INFRA_BIN / name
    if not path.exists():
        pytest.skip(f"{path} is missing: `make setup` installs the infra tools into .venv-infra")
    return path


def test_terraform_fmt():
    result = subprocess.run([str(_tool("terraform")), "fmt", "-check", "-recursive", "-diff", str(TF)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}{result.stderr}\nrun: .venv-infra/bin/terraform fmt -recursive infra/terraform"


def test_checkov_finds_nothing_but_documented_skips():
    """Offline, checkov knows no severities (they come from Prisma Cloud's API: every result's
    severity is None), so no failed check at all is allowed; a deliberate exception is a
    `#checkov:skip=ID:reason` comment in the resource, and its reason must say why."""
    result = subprocess.run([str(_tool("checkov")), "-d", str(TF), "--framework", "terraform", "--quiet", "--compact",
                             "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [f"{r['check_id']} {r['resource']}: {r['check_name']}" for r in report["results"]["failed_checks"]]
    assert not failed, "checkov failed:\n" + "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 50
    for path in TF.glob("*.tf"):
        for skip in re.findall(r"#checkov:skip=([^\n]*)", path.read_text()):
            check, _, reason = skip.partition(":")
            assert re.fullmatch(r"CKV2?_[A-Z]+_\d+", check) and len(reason.split()) >= 5, f"{path.name}: {skip!r} needs a reason"
