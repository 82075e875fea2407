"""The trust boundary (issue 21), tried as a caller without the right would: every write path refuses
(401 / 403 with the reason, before the target is looked up) and nothing changes — no version, alias,
sign-off, policy, token or run is created or moved. The domain checks run on the SQLite documents and
on the Firestore emulator; the HTTP doors on the tracker's API, the approval function and the bucket's
drop door."""
import io
import json
import logging
import threading

import pytest

from shared.domain import access, events as ev, jobs, model_policy, model_registry as reg, privacy
from shared.domain.access import AccessDenied, Caller
from shared.domain.recipe import apply_overrides, load_recipe
from shared.platform.auth import TOKENS, token_authenticator
from shared.platform.push import AuthError
from shared.platform.runtime import Context
from tests.unit.governance import ADMIN, own, token
from tests.unit.test_eval_push import google_keys  # noqa: F401  (a fixture)
from tests.unit.test_registry_ops import add

from services.tracker.api import READ_ROLE, ROUTE_ROLES, create_app

NAME = "support-bot"   # tests/unit/test_registry_ops.py's model
RECIPE = load_recipe("tiny-sft")
WATCHED = ("models", "model_versions", "model_policies", "privacy_signoffs", "runs", "tokens", "principals",
           "tenants", "token_names")


def snapshot(adapters) -> dict:
    """Everything a refused call must leave as it was: the governed documents, the bucket, the bus."""
    docs = {c: sorted((i, json.dumps(d, sort_keys=True, default=str)) for i, d in adapters.docs.query(c))
            for c in WATCHED}
    objects = sorted(i.name for i in adapters.store.list("ftpipe", ""))
    return {"docs": docs, "objects": objects}


def viewer(tenant="default") -> Caller:
    return Caller(subject="token:vic", grants={tenant: frozenset({"viewer"})})


def submitter(tenant="default") -> Caller:
    return Caller(subject="token:sam", grants={tenant: frozenset({"submitter"})})


def approver(tenant="default", subject="token:ann") -> Caller:
    return Caller(subject=subject, grants={tenant: frozenset({"approver"})})


# ------------------------------------------------------------------ roles

def test_roles_imply_what_they_should_and_no_more():
    both = Caller(subject="x", grants={"a": frozenset({"submitter"}), "b": frozenset({"approver"})})
    assert both.may("viewer", "a") and both.may("viewer", "b") and both.may("submitter", "a")
    assert not both.may("approver", "a") and not both.may("submitter", "b") and not both.may("viewer", "c")
    assert not both.may("admin") and both.tenants("viewer") == ["a", "b"] and both.tenants("approver") == ["b"]
    assert ADMIN.may("approver", "anything") and ADMIN.tenants() is None
    door = Caller.for_door("a", "incoming/a/")
    assert door.may("submitter", "a") and not door.may("approver", "a") and not door.may("submitter", "b")
    with pytest.raises(AccessDenied) as refused:
        access.require(viewer(), "approver", "default", to="approve x")
    assert refused.value.status == 403 and "you need approver in tenant default" in refused.value.reason
    assert "ftpipe roles grant token:vic --role approver --tenant default" in refused.value.reason
    with pytest.raises(AccessDenied) as unsigned:
        access.require(None, "viewer", to="look")
    assert unsigned.value.status == 401


def test_tokens_are_stored_hashed_named_once_revocable_and_only_an_admin_makes_them(adapters):
    authenticate = token_authenticator(adapters.docs)
    secret = token(adapters.docs, "ci", "submitter")
    stored = json.dumps([d for _, d in adapters.docs.query(TOKENS)] + [d for _, d in adapters.docs.query("token_names")])
    assert secret.startswith("ftp_") and secret not in stored
    assert authenticate({"Authorization": f"Bearer {secret}"}).subject == "token:ci"
    with pytest.raises(ValueError, match="a token named 'ci' exists"):
        token(adapters.docs, "ci", "viewer")
    for caller in (viewer(), submitter(), approver()):
        with pytest.raises(AccessDenied, match="you need admin"):
            access.create_token(adapters.docs, caller, "mine", "admin", None)
        with pytest.raises(AccessDenied, match="you need admin"):
            access.grant(adapters.docs, caller, caller.subject, "approver", "default")
    access.revoke_token(adapters.docs, ADMIN, "ci")
    with pytest.raises(AuthError, match="unknown or revoked"):
        authenticate({"Authorization": f"Bearer {secret}"})


def test_the_stack_token_is_the_local_admin_and_a_regenerated_one_voids_the_old(adapters):
    first = token_authenticator(adapters.docs, "first-secret")
    assert access.caller_of(adapters.docs, first({"Authorization": "Bearer first-secret"})).admin
    second = token_authenticator(adapters.docs, "second-secret")   # the file was deleted and regenerated
    with pytest.raises(AuthError, match="unknown or revoked"):
        second({"Authorization": "Bearer first-secret"})


# ------------------------------------------------------------------ registry operations, on every document store

@pytest.fixture(params=["sqlite", "firestore"])
def store_docs(request, adapters):
    """The governed documents on each DocStore (the Firestore emulator where it is installed)."""
    if request.param == "sqlite":
        yield adapters.docs
        return
    from tests.emulators import make_firestore_docs

    yield make_firestore_docs(request.getfixturevalue("firestore_emulator"))


def _versions(docs) -> dict:
    return {i: (d["status"], d.get("approval")) for i, d in docs.query("model_versions")} | {
        "aliases": json.dumps((docs.get("models", NAME) or {}).get("aliases"), sort_keys=True)}


def test_registry_operations_refuse_callers_without_the_role_and_change_nothing(adapters, store_docs):
    docs = store_docs
    adapters.docs = docs   # add() registers on the store under test
    add(adapters, "r1")
    candidate = add(adapters, "r2", approval=True)
    before = _versions(docs)
    calls = {
        "approve": lambda c: reg.approve(docs, adapters.bus, NAME, candidate, caller=c),
        "promote": lambda c: reg.promote(docs, adapters.bus, NAME, candidate, alias="staging", caller=c),
        "rollback": lambda c: reg.rollback(docs, adapters.bus, NAME, caller=c),
        "archive": lambda c: reg.archive(docs, adapters.bus, NAME, candidate, caller=c, reason="x"),
        "quarantine": lambda c: reg.quarantine(docs, adapters.bus, NAME, candidate, caller=c, reason="x"),
    }
    for name, call in calls.items():
        for caller, status, says in ((None, 401, "sign in"), (viewer(), 403, "you need approver in some tenant"),
                                     (submitter(), 403, "you need approver in some tenant"),
                                     (approver("other-team"), 403, "you need approver in tenant default")):
            with pytest.raises(AccessDenied) as refused:
                call(caller)
            assert refused.value.status == status and says in refused.value.reason, (name, refused.value.reason)
    # before any lookup: a model that does not exist gets the same 403, not a 404 that would say so
    with pytest.raises(AccessDenied):
        reg.approve(docs, adapters.bus, "no-such-model", "9.9", caller=viewer())
    assert _versions(docs) == before
    assert reg.approve(docs, adapters.bus, NAME, candidate, caller=approver())["approval"]["approver"] == "token:ann"


def test_four_eyes_the_submitter_holding_approver_cannot_approve_its_own_version(adapters, store_docs):
    docs = store_docs
    adapters.docs = docs
    model_policy.set_policy(docs, ADMIN, NAME, owners=("default",), approval_required=True, four_eyes=True)
    candidate = add(adapters, "r-own", approval=True)
    docs.set("runs", "r-own", {"run_id": "r-own", "tenant": "default", "source": {"by": "token:ann"}})
    both = Caller(subject="token:ann", grants={"default": frozenset({"submitter", "approver"})})
    with pytest.raises(AccessDenied, match="you submitted run r-own.*four eyes"):
        reg.approve(docs, adapters.bus, NAME, candidate, caller=both)
    with pytest.raises(AccessDenied, match="four eyes"):
        reg.promote(docs, adapters.bus, NAME, candidate, caller=both)
    assert reg.get_version(docs, NAME, candidate)["status"] == "candidate"
    assert reg.approve(docs, adapters.bus, NAME, candidate, caller=approver(subject="token:bob"))["status"] == "promoted"


def test_policy_changes_are_an_admins(adapters):
    for caller in (viewer(), submitter(), approver()):
        with pytest.raises(AccessDenied, match="you need admin"):
            model_policy.set_policy(adapters.docs, caller, NAME, owners=("default",), approval_required=False)
    assert model_policy.get_policy(adapters.docs, NAME) is None


# ------------------------------------------------------------------ submissions

@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    return str(path)


def _submit(adapters, caller, chats, **job):
    return jobs.submit(adapters.docs, adapters.store, adapters.bus, "ftpipe", caller,
                       {"recipe": "tiny-sft", "dataset": chats, **job})


@pytest.mark.parametrize("overrides, says", [
    ({"eval.safety.enabled": False}, "'eval.safety.enabled'=False: a submitter may only tighten it"),
    ({"eval.memorisation.enabled": False}, "'eval.memorisation.enabled'=False: a submitter may only tighten it"),
    ({"eval.gate": {"chrf": {"action": "off"}}}, "'eval.gate': a submitter may only make gate rules stricter"),
    ({"eval.gate.chrf": {"action": "off"}}, "a submitter may only make gate rules stricter"),
    ({"eval.gate.chrf": {"tolerance": 0.5, "relative": True}}, "a submitter may only make gate rules stricter"),
    ({"eval.max_examples": 2}, "'eval.max_examples'=2: a submitter may only tighten it"),
    ({"scheduling.priority": "production"}, "'scheduling.priority': only an admin may change it"),
    ({"hardware.price_per_gpu_hour": 0.0}, "'hardware.price_per_gpu_hour': only an admin may change it"),
    ({"data.pii_categories": []}, "only an admin may change it"),
])
def test_a_submitter_cannot_loosen_governance_by_overrides(adapters, chats, overrides, says):
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("default",), approval_required=True)
    before = snapshot(adapters)
    with pytest.raises(jobs.JobError) as refused:
        _submit(adapters, submitter(), chats, overrides=overrides)
    assert refused.value.status == 403 and says in str(refused.value), str(refused.value)
    assert snapshot(adapters) == before
    assert adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=0.2) == []


def test_a_submitter_changes_hyperparameters_and_tightens_and_the_policy_holds(adapters, chats):
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("default",), approval_required=True,
                            privacy_review=False)
    _submit(adapters, submitter(), chats, overrides={"training.epochs": 1, "adapter.r": 4, "data.privacy_review": True,
                                                    "eval.gate.chrf": {"tolerance": 50.0, "against": ["base", "production"]}})
    [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=2)
    job = ev.decode(msg.data, msg.attributes)
    assert job.recipe.training.epochs == 1 and job.recipe.data.privacy_review
    assert job.recipe.registry.approval   # the recipe says false; the policy raised it
    assert job.source["by"] == "token:sam" and job.tenant == "default"


def test_a_policy_that_forbids_an_llm_judge_refuses_a_job_naming_one_and_drops_it_at_the_doors(adapters, chats):
    """Only an admin names a judge (an override), and the model's owners can still keep the answers in."""
    judge = {"base_url": "http://127.0.0.1:9/v1", "model": "judge"}
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("default",), llm_judge=False)
    before = snapshot(adapters)
    with pytest.raises(jobs.JobError, match="llm_judge: false") as refused:
        _submit(adapters, ADMIN, chats, overrides={"eval.judge": judge})
    assert refused.value.status == 403 and snapshot(adapters) == before
    # an event that reached a service by another door: govern() takes the judge out
    judged = apply_overrides(RECIPE, {"eval.judge": judge})
    policy = model_policy.get_policy(adapters.docs, RECIPE.model_name)
    assert model_policy.loosenings(judged, policy) and model_policy.govern(judged, policy).eval.judge is None
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, llm_judge=True)
    _submit(adapters, ADMIN, chats, overrides={"eval.judge": judge})
    [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=2)
    assert ev.decode(msg.data, msg.attributes).recipe.eval.judge.model == "judge"


def test_tenants_are_bound_to_identity_and_names_to_their_owners(adapters, chats):
    adapters.docs.set("tenants", "team-b", {})
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("team-b",))
    before = snapshot(adapters)
    with pytest.raises(AccessDenied, match="you need submitter in tenant team-b"):
        _submit(adapters, submitter(), chats, tenant="team-b")
    with pytest.raises(jobs.JobError, match="tenant default does not own model 'tiny-sft'") as refused:
        _submit(adapters, submitter(), chats)
    assert refused.value.status == 403
    with pytest.raises(jobs.JobError, match="no tenant 'team-c'"):
        _submit(adapters, Caller(subject="x", grants={"team-c": frozenset({"submitter"})}), chats, tenant="team-c")
    with pytest.raises(AccessDenied, match="you need submitter"):
        _submit(adapters, viewer(), chats)
    # an unclaimed name: only an admin's job claims it
    with pytest.raises(jobs.JobError, match="'another-bot' has no policy yet"):
        _submit(adapters, submitter(), chats, overrides={"model_name": "another-bot"})
    assert snapshot(adapters) == before


def _custom(adapters, chats, **changes) -> str:
    from pathlib import Path

    import yaml

    raw = load_recipe("tiny-sft").model_dump(mode="json") | changes
    path = Path(chats).with_name(f"custom-{abs(hash(json.dumps(changes, sort_keys=True)))}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_custom_recipe_is_judged_as_overrides_and_shadows_no_one(adapters, chats):
    own(adapters.docs, RECIPE)
    with pytest.raises(jobs.JobError, match="'scheduling.priority': only an admin"):
        _submit(adapters, submitter(), chats, recipe=_custom(adapters, chats, scheduling={"priority": "production"}))
    jobs.drop(adapters.docs, adapters.store, "ftpipe", ADMIN, chats,
              _custom(adapters, chats, training=RECIPE.training.model_dump(mode="json") | {"epochs": 1.0}))
    names = [i.name for i in adapters.store.list("ftpipe", "recipes/")]
    assert names == ["recipes/default/tiny-sft.yaml"]   # the tenant's own folder: no one else's tiny-sft changes


def test_a_gate_with_no_rules_is_refused_at_submission_and_never_passes():
    from shared.domain.gate_rules import default_rules

    from services.evaluator.gate import gate

    recipe = load_recipe("tiny-sft")
    off = {m: {"action": "off"} for m in default_rules(recipe)}
    empty = apply_overrides(recipe, {"eval.gate": off})
    decision = gate(empty, {"base": {"chrf": 1.0}, "candidate": {"chrf": 99.0}})
    assert not decision.passed and "a gate that checks nothing is refused" in decision.reasons[0]


def test_an_admin_job_with_an_empty_gate_is_refused_too(adapters, chats):
    from shared.domain.gate_rules import default_rules

    off = {m: {"action": "off"} for m in default_rules(RECIPE)}
    with pytest.raises(jobs.JobError, match="a gate with no rules is refused"):
        _submit(adapters, ADMIN, chats, overrides={"eval.gate": off, "eval.safety.enabled": False,
                                                   "eval.memorisation.enabled": False, "eval.fairness.enabled": False})


def test_cancel_and_privacy_decisions_need_the_tenants_role(adapters):
    adapters.docs.set("runs", "r-b", {"run_id": "r-b", "tenant": "team-b", "status": "queued",
                                      "sub_state": privacy.AWAITING, "privacy_review": {"event": {}}})
    before = snapshot(adapters)
    with pytest.raises(AccessDenied, match="you need submitter in tenant team-b"):
        jobs.cancel(adapters.docs, submitter(), "r-b")
    for decide in (lambda c: privacy.approve(adapters.docs, adapters.store, adapters.bus, "r-b", caller=c),
                   lambda c: privacy.reject(adapters.docs, adapters.bus, "r-b", reason="no", caller=c)):
        with pytest.raises(AccessDenied, match="you need approver"):
            decide(submitter("team-b"))
        with pytest.raises(AccessDenied, match="you need approver in tenant team-b"):
            decide(approver("default"))
    assert snapshot(adapters) == before


# ------------------------------------------------------------------ doors without a verified caller

def _ctx(adapters) -> Context:
    return Context("preprocess", adapters, message=None, stopping=threading.Event(),   # type: ignore[arg-type]
                   log=logging.LoggerAdapter(logging.getLogger("test"), {}))


def test_a_drop_is_held_to_its_prefixs_tenant(adapters, chats):
    from services.preprocess.service import on_upload

    ctx = _ctx(adapters)
    adapters.docs.set("tenants", "team-a", {})
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("team-b",))
    for name, says in (("incoming/team-a/tiny-sft/x.jsonl", "tenant team-a does not own model 'tiny-sft'"),
                       ("incoming/nobody/tiny-sft/x.jsonl", "no tenant 'nobody'"),
                       ("incoming/tiny-sft/x.jsonl", "tenant default does not own")):
        adapters.store.upload_file("ftpipe", name, chats)
        [out] = on_upload(ev.ObjectFinalized(bucket="ftpipe", name=name, generation="1"), ctx)
        assert isinstance(out, ev.DatasetRejected) and says in out.reason, out


def test_a_forged_job_message_is_bounded_by_the_policy(adapters):
    """A JobSubmitted published straight onto the bus (someone with publish rights on `jobs`), for a
    tenant that does not own the model and with approval off: preprocess refuses it."""
    from services.preprocess.service import on_job

    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("team-b",), approval_required=True)
    forged = ev.JobSubmitted(run_id="forged", recipe=RECIPE, dataset_uri="file:///x", tenant="default")
    [out] = on_job(forged, _ctx(adapters))
    assert isinstance(out, ev.DatasetRejected) and "does not own" in out.reason


# ------------------------------------------------------------------ the tracker's API

@pytest.fixture
def api(adapters):
    return create_app(adapters, token_authenticator(adapters.docs, "stack-secret")).test_client()


def _bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


def test_every_api_route_has_a_role_and_refuses_a_caller_without_it_before_any_lookup(adapters, api):
    rules = [(m, r.rule) for r in api.application.url_map.iter_rules() if r.rule.startswith("/api/")
             for m in r.methods - {"HEAD", "OPTIONS"}]
    writes = [(m, r) for m, r in rules if m != "GET"]
    assert set(writes) <= set(ROUTE_ROLES), set(writes) - set(ROUTE_ROLES)
    stranger = token(adapters.docs, "stranger", "viewer", "team-z")
    before = snapshot(adapters)
    for method, rule in rules:
        path = rule.replace("<", "").replace(">", "")   # targets that do not exist: the role is checked first
        role = ROUTE_ROLES.get((method, rule), READ_ROLE)
        resp = api.open(path, method=method, headers=_bearer(stranger), json={})
        if role == READ_ROLE:
            assert resp.status_code in (200, 400, 404), (method, rule, resp.status_code)
        else:
            assert resp.status_code == 403 and f"you need {role}" in resp.get_json()["error"], (method, rule, resp.get_json())
        resp = api.open(path, method=method, json={})
        assert resp.status_code == 401, (method, rule)
    assert snapshot(adapters) == before


def test_a_viewer_of_another_tenant_sees_none_of_its_runs_or_models(adapters, api):
    add(adapters, "r1")
    adapters.docs.set("runs", "r1", {"run_id": "r1", "tenant": "default", "status": "succeeded", "created_at": 1})
    outsider = _bearer(token(adapters.docs, "outsider", "viewer", "team-z"))
    insider = _bearer(token(adapters.docs, "insider", "viewer", "default"))
    assert api.get("/api/runs", headers=outsider).get_json() == []
    assert api.get("/api/runs/r1", headers=outsider).status_code == 404
    assert api.get("/api/models", headers=outsider).get_json() == []
    assert api.get(f"/api/models/{NAME}", headers=outsider).status_code == 404
    assert [r["run_id"] for r in api.get("/api/runs", headers=insider).get_json()] == ["r1"]
    assert [m["name"] for m in api.get("/api/models", headers=insider).get_json()] == [NAME]


def test_an_unauthorised_upload_is_refused_before_it_is_read(adapters, api):
    viewer_token = token(adapters.docs, "looker", "viewer", "default")
    resp = api.post("/api/runs", headers=_bearer(viewer_token), data={
        "file": (io.BytesIO(b"{}\n" * 1000), "x.jsonl"), "recipe": "tiny-sft"})
    assert resp.status_code == 403 and "you need submitter" in resp.get_json()["error"]
    assert [i.name for i in adapters.store.list("ftpipe", "uploads/")] == []


def test_the_approval_endpoint_and_the_cli_take_the_same_roles(adapters, tmp_path, monkeypatch, capsys):
    from ftpipe.cli import main

    add(adapters, "r1")
    candidate = add(adapters, "r2", approval=True)
    monkeypatch.setenv("FTPIPE_STATE", str(adapters.settings.state_dir))
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    sam = token(adapters.docs, "sam", "submitter")
    for argv in (["models", "approve", NAME, candidate], ["models", "promote", NAME, candidate],
                 ["models", "rollback", NAME], ["models", "quarantine", NAME, candidate, "--reason", "x"],
                 ["privacy", "approve", "r2"], ["models", "policy", NAME, "--owner", "default"],
                 ["tokens", "create", "mine", "--role", "admin"], ["tenants", "set", "x", "--max-concurrent", "1"],
                 ["dlq", "replay"]):
        assert main([*argv, "--token", sam]) == 3, argv
        assert "refused:" in capsys.readouterr().err
    assert reg.get_version(adapters.docs, NAME, candidate)["status"] == "candidate"


# ------------------------------------------------------------------ serving in the cloud

def test_serving_in_the_cloud_takes_only_the_listed_callers(adapters, google_keys):  # noqa: F811
    from shared.platform.auth import oidc_authenticator
    from tests.unit.test_eval_push import token as id_token

    signer, _, certs_url = google_keys
    audience = "https://serving-abc.a.run.app"
    listed = "app@proj.iam.gserviceaccount.com"
    check = access.serving_authenticator(oidc_authenticator(audience, certs_url=certs_url), adapters.docs,
                                         allowed=(listed,))
    assert check({"Authorization": f"Bearer {id_token(signer, aud=audience, email=listed)}"}).subject == listed
    with pytest.raises(AccessDenied) as refused:   # a valid Google ID token for the audience is not enough
        check({"Authorization": f"Bearer {id_token(signer, aud=audience, email='someone@gmail.com')}"})
    assert refused.value.status == 403 and "FTPIPE_SERVING_CALLERS" in refused.value.reason
    nobody = access.serving_authenticator(oidc_authenticator(audience, certs_url=certs_url), adapters.docs, allowed=())
    with pytest.raises(AccessDenied):   # an empty list lets no one in, never everyone
        nobody({"Authorization": f"Bearer {id_token(signer, aud=audience, email=listed)}"})


# ------------------------------------------------------------------ Pub/Sub job doors

@pytest.fixture(params=["local", "emulators"])
def door_adapters(request, tmp_path):
    """Adapters whose stack opens the job doors of team-a and team-b: the SQLite bus and documents, or
    the Pub/Sub and Firestore emulators (with the local store)."""
    from shared.platform.config import Adapters, Settings, bootstrap
    from shared.platform.topology import ensure_topology

    settings = Settings(state_dir=tmp_path / "state", job_doors=("team-a", "team-b"))
    local = bootstrap(settings)
    if request.param == "local":
        yield local
    else:
        from tests.emulators import make_firestore_docs, make_pubsub_bus

        bus = make_pubsub_bus(request.getfixturevalue("pubsub_emulator"))
        docs = make_firestore_docs(request.getfixturevalue("firestore_emulator"))
        ensure_topology(bus, settings.subscription_policy(), doors=settings.job_doors)
        yield Adapters(settings=settings, bus=bus, store=local.store, docs=docs)
        bus.close()
    local.close()


def _knock(adapters, door: str, **body) -> list:
    """Publish a JobRequested on `door`'s topic as any Pub/Sub client would, let preprocess take it,
    and return what it published."""
    from shared.platform.runtime import handle_message

    from services.preprocess.service import SERVICE as PREPROCESS

    topic = ev.door_topic(door)
    data, attributes = ev.encode(ev.JobRequested(**body))
    adapters.bus.publish(topic, data, attributes)
    [msg] = adapters.bus.pull(ev.subscription_name("preprocess", topic), max_messages=1, timeout_s=10)
    assert handle_message(PREPROCESS, adapters, topic, msg) == "acked"
    out = []
    for topic in (ev.JOBS, ev.DATASETS):
        for m in adapters.bus.pull(ev.subscription_name("tracker", topic), max_messages=10, timeout_s=1):
            out.append(ev.decode(m.data, m.attributes))
            m.ack()
    return out


def test_a_job_door_acts_as_a_submitter_of_its_tenant_and_no_more(door_adapters, chats):
    adapters = door_adapters
    adapters.docs.set("tenants", "team-a", {})
    adapters.docs.set("tenants", "team-b", {})
    model_policy.set_policy(adapters.docs, ADMIN, RECIPE.model_name, owners=("team-a",), approval_required=True)
    adapters.store.upload_file("ftpipe", "incoming/team-a/chats.jsonl", chats)
    adapters.store.upload_file("ftpipe", "incoming/team-b/chats.jsonl", chats)
    mine = adapters.store.url("ftpipe", "incoming/team-a/chats.jsonl")
    before = {c: adapters.docs.query(c) for c in ("runs", "model_versions", "model_policies")}

    for n, (door, body, says) in enumerate((
        ("team-a", {"tenant": "team-b"}, "it names tenant 'team-b' and arrived on the door of 'team-a'"),
        ("team-a", {"overrides": {"scheduling.priority": "production"}}, "'scheduling.priority': only an admin"),
        ("team-a", {"overrides": {"registry.approval": False, "eval.safety.enabled": False}},
         "'eval.safety.enabled'=False: a submitter may only tighten it"),
        ("team-b", {"tenant": "team-b"}, "tenant team-b does not own model 'tiny-sft'"),
        ("team-a", {"dataset_uri": adapters.store.url("ftpipe", "incoming/team-b/chats.jsonl")},
         "a store URL must be under incoming/team-a/"),
        ("team-a", {"dataset_uri": "file:///etc/passwd"}, "is not an object of this store"),
    )):
        request = {"run_id": f"r{n}", "tenant": "team-a", "recipe": "tiny-sft", "dataset_uri": mine} | body
        [out] = _knock(adapters, door, **request)
        assert isinstance(out, ev.DatasetRejected) and says in out.reason, (door, body, out.reason)
        assert out.reason.startswith(f"job request 'r{n}' on job-requests.{door} refused: ")
    assert {c: adapters.docs.query(c) for c in before} == before

    [job] = _knock(adapters, "team-a", run_id="r-good", tenant="team-a", recipe="tiny-sft", dataset_uri=mine,
                   overrides={"training.epochs": 1})
    assert isinstance(job, ev.JobSubmitted) and job.tenant == "team-a" and job.recipe.training.epochs == 1
    assert job.recipe.registry.approval   # raised to the model's policy
    assert job.source == {"by": "door:job-requests.team-a", "request": "r-good"}
    assert job.run_id == ev.derive_run_id("door", "job-requests.team-a", "r-good")   # not the caller's own id
