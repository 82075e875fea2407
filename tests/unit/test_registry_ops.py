"""The model registry's operations (shared/domain/model_registry.py) on the real local adapters: approve,
promote, roll back, archive, quarantine; their rules, their alias history, the events they publish
and that a retry republishes the same ids — and the `ftpipe models` commands over them."""
import json
import logging

import pytest

from ftpipe.cli import main
from shared.domain import events as ev, model_registry as reg
from shared.domain.access import Caller
from shared.domain.recipe import load_recipe
from shared.platform.runtime import publish_event
from tests.unit.bus_drain import drain


def admin(name: str) -> Caller:
    """A caller who may do anything (an admin), recorded as `name`."""
    return Caller(subject=name, admin=True)


NAME = "support-bot"
BASE = "tiny-random-smollm2"
RECIPE = load_recipe("tiny-sft")


def add(adapters, run_id: str, *, passed: bool = True, approval: bool = False, base: str = BASE) -> str:
    """A version as the registry's handler records it once its bundle is written."""
    version = reg.allocate_version(adapters.docs, NAME, run_id, base)
    doc = {"name": NAME, "version": version, "run_id": run_id, "uri": f"file:///b/models/{NAME}/{version}/",
           "base_model": base, "evaluation": {"passed": passed}}
    reg.register_version(adapters.docs, doc, passed=passed, reasons=[] if passed else ["worse than base"],
                         approval=approval)
    return version


def errored(adapters, run_id: str, *, reevaluation: int = 0) -> str:
    """A version whose evaluation errored, as the registry's handler records it (register_errored)."""
    version = reg.allocate_version(adapters.docs, NAME, run_id, BASE)
    request = ev.TrainingCompleted(run_id=run_id, recipe=RECIPE, dataset_uri="file:///b/datasets/d1/",
                                   adapter_uri=f"file:///b/runs/{run_id}/adapter/", metrics={"train_loss": 1.0}, steps=3)
    doc = {"name": NAME, "version": version, "run_id": run_id, "uri": f"file:///b/models/{NAME}/{version}/",
           "base_model": BASE, "evaluation": {"error": "OSError: [Errno 5] Input/output error", "attempts": 5},
           "evaluation_request": request.model_dump(mode="json", exclude={"reevaluation"})}
    _, events = reg.register_unevaluated(adapters.docs, doc, error="OSError: [Errno 5] Input/output error",
                                         approval=False, reevaluation=reevaluation)
    for event in events:   # what the handler's runtime publishes
        publish_event(adapters.bus, event)
    return version


def requests(adapters) -> list:
    """The TrainingCompleted events a re-evaluation published, as the evaluator receives them."""
    return drain(adapters, ev.subscription_name("evaluator", ev.TRAINING))


def stored_reevaluations(adapters, version: str) -> int:
    return reg.get_version(adapters.docs, NAME, version)["reevaluations"]


def published(adapters) -> list:
    return drain(adapters, ev.subscription_name("tracker", ev.MODELS))


def status(adapters, version: str) -> str:
    return reg.get_version(adapters.docs, NAME, version)["status"]


def production(adapters) -> str | None:
    return reg.get_model(adapters.docs, NAME)["aliases"].get("production")


def test_promote_moves_production_archives_the_previous_and_records_the_move(adapters):
    for run in ("r1", "r2"):
        add(adapters, run)
    published(adapters)
    assert production(adapters) == "1.2" and status(adapters, "1.1") == "archived"

    doc = reg.promote(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"))
    assert doc["status"] == "promoted" and doc["aliases"] == ["production"]
    assert status(adapters, "1.2") == "archived"
    model = reg.get_model(adapters.docs, NAME)
    assert [(e["version"], e["previous"], e["reason"], e["actor"]) for e in model["alias_history"]["production"]] == [
        ("1.1", None, "gate", None), ("1.2", "1.1", "gate", None), ("1.1", "1.2", "manual", "ann")]
    assert [v["version"] for v in model["versions"]] == ["1.2", "1.1"]
    events = published(adapters)
    assert [(e.type, e.version) for e in events] == [("ModelPromoted", "1.1"), ("ModelArchived", "1.2")]
    promoted, archived = events
    assert (promoted.alias, promoted.previous_version, promoted.reason, promoted.actor, promoted.move) == (
        "production", "1.2", "manual", "ann", 3)
    assert promoted.run_id == "r1" and archived.run_id == "r2" and archived.reason == "superseded by 1.1 in production"

    # The same call again: nothing changes, the same event ids are published again.
    assert reg.promote(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"))["status"] == "promoted"
    assert [e.event_id for e in published(adapters)] == [e.event_id for e in events]
    assert len(reg.get_model(adapters.docs, NAME)["alias_history"]["production"]) == 3


def test_rollback_goes_to_the_previous_production_version_each_time_and_to_a_named_one(adapters):
    for run in ("r1", "r2", "r3"):
        add(adapters, run)
    doc = reg.rollback(adapters.docs, adapters.bus, NAME, caller=admin("bob"))
    assert doc["version"] == "1.2" and production(adapters) == "1.2" and status(adapters, "1.3") == "archived"
    assert reg.rollback(adapters.docs, adapters.bus, NAME, caller=admin("bob"))["version"] == "1.1"
    with pytest.raises(reg.RegistryError, match="no earlier version to roll back to") as exc:
        reg.rollback(adapters.docs, adapters.bus, NAME, caller=admin("bob"))
    assert exc.value.status == 409
    published(adapters)
    assert reg.rollback(adapters.docs, adapters.bus, NAME, to="1.3", caller=admin("bob"))["version"] == "1.3"
    [promoted, archived] = published(adapters)
    assert (promoted.version, promoted.reason, promoted.previous_version, archived.version) == ("1.3", "rollback", "1.1", "1.1")
    assert archived.reason == "rolled back to 1.3 in production"
    with pytest.raises(reg.RegistryError, match="no version '9.9'") as exc:
        reg.rollback(adapters.docs, adapters.bus, NAME, to="9.9", caller=admin("bob"))
    assert exc.value.status == 404


def test_a_quarantined_version_is_never_promoted(adapters):
    add(adapters, "r1")
    bad = add(adapters, "r2", passed=False)
    assert status(adapters, bad) == "quarantined" and production(adapters) == "1.1"
    for attempt in (lambda: reg.promote(adapters.docs, adapters.bus, NAME, bad, caller=admin("ann")),
                    lambda: reg.promote(adapters.docs, adapters.bus, NAME, bad, alias="staging", caller=admin("ann")),
                    lambda: reg.rollback(adapters.docs, adapters.bus, NAME, to=bad, caller=admin("ann")),
                    lambda: reg.approve(adapters.docs, adapters.bus, NAME, bad, caller=admin("ann")),
                    lambda: reg.archive(adapters.docs, adapters.bus, NAME, bad, caller=admin("ann"), reason="tidy")):
        with pytest.raises(reg.RegistryError, match="quarantined") as exc:
            attempt()
        assert exc.value.status == 409
    # … nor by rollback's own choice: quarantining an earlier production version takes it out of reach
    add(adapters, "r3")
    reg.quarantine(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"), reason="leaks a phone number")
    with pytest.raises(reg.RegistryError, match="no earlier version"):
        reg.rollback(adapters.docs, adapters.bus, NAME, caller=admin("ann"))


def test_approval_promotes_a_candidate_and_a_candidate_needs_it(adapters):
    add(adapters, "r1")
    candidate = add(adapters, "r2", approval=True)
    assert status(adapters, candidate) == "candidate" and production(adapters) == "1.1"
    assert reg.get_model(adapters.docs, NAME)["aliases"]["staging"] == candidate
    with pytest.raises(reg.RegistryError, match="waits for approval") as exc:
        reg.promote(adapters.docs, adapters.bus, NAME, candidate, caller=admin("ann"))
    assert exc.value.status == 409
    published(adapters)

    doc = reg.approve(adapters.docs, adapters.bus, NAME, candidate, caller=admin("ann@example.com"), note="looks good")
    assert doc["status"] == "promoted" and production(adapters) == candidate and status(adapters, "1.1") == "archived"
    assert doc["approval"]["approver"] == "ann@example.com" and doc["approval"]["note"] == "looks good"
    assert [h["status"] for h in doc["history"]] == ["candidate", "approved", "promoted"]
    events = published(adapters)
    assert [(e.type, e.version) for e in events] == [("ModelApproved", "1.2"), ("ModelPromoted", "1.2"),
                                                     ("ModelArchived", "1.1")]
    assert events[0].approver == "ann@example.com" and events[1].reason == "approval" and events[1].actor == "ann@example.com"
    # approving again: no change, the same events
    reg.approve(adapters.docs, adapters.bus, NAME, candidate, caller=admin("someone else"))
    assert [e.event_id for e in published(adapters)] == [e.event_id for e in events]
    with pytest.raises(reg.RegistryError, match="does not wait for approval"):
        reg.approve(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"))


def test_approving_an_older_candidate_leaves_the_later_production_version(adapters):
    older = add(adapters, "r1", approval=True)
    newer = add(adapters, "r2", approval=True)
    reg.approve(adapters.docs, adapters.bus, NAME, newer, caller=admin("ann"))
    doc = reg.approve(adapters.docs, adapters.bus, NAME, older, caller=admin("ann"))
    assert doc["status"] == "approved" and production(adapters) == newer
    assert reg.promote(adapters.docs, adapters.bus, NAME, older, caller=admin("ann"))["status"] == "promoted"


def test_archive_and_quarantine_refuse_the_production_version_and_take_staging_away(adapters):
    add(adapters, "r1")
    candidate = add(adapters, "r2", approval=True)
    for retire in (reg.archive, reg.quarantine):
        with pytest.raises(reg.RegistryError, match="is in production: roll back") as exc:
            retire(adapters.docs, adapters.bus, NAME, "1.1", caller=admin("ann"), reason="old")
        assert exc.value.status == 409
    with pytest.raises(reg.RegistryError, match="a reason is required") as exc:
        reg.archive(adapters.docs, adapters.bus, NAME, candidate, caller=admin("ann"), reason=" ")
    assert exc.value.status == 400
    published(adapters)
    doc = reg.archive(adapters.docs, adapters.bus, NAME, candidate, caller=admin("ann"), reason="superseded by a retrain")
    assert doc["status"] == "archived" and "staging" not in reg.get_model(adapters.docs, NAME)["aliases"]
    [archived] = published(adapters)
    assert (archived.type, archived.reason, archived.actor) == ("ModelArchived", "superseded by a retrain", "ann")
    cleared = reg.get_model(adapters.docs, NAME)["alias_history"]["staging"][-1]
    assert (cleared["version"], cleared["previous"], cleared["reason"]) == (None, candidate, "archive")
    # an archived version comes back by promotion (to staging: it still waits for approval for production)
    assert reg.promote(adapters.docs, adapters.bus, NAME, candidate, alias="staging", caller=admin("ann"))["aliases"] == ["staging"]
    assert [(e.type, e.alias) for e in published(adapters)] == [("ModelPromoted", "staging")]
    doc = reg.quarantine(adapters.docs, adapters.bus, NAME, candidate, caller=admin("ann"), reason="leaks PII")
    assert doc["status"] == "quarantined" and doc["aliases"] == []
    [quarantined] = published(adapters)
    assert quarantined.reasons == ["leaks PII"] and quarantined.actor == "ann"


def test_reads_and_their_errors(adapters):
    assert reg.list_models(adapters.docs) == []
    with pytest.raises(reg.RegistryError, match="no model 'nope'; registered models: none yet") as exc:
        reg.get_model(adapters.docs, "nope")
    assert exc.value.status == 404
    add(adapters, "r1")
    add(adapters, "r2", base="smollm2-135m-instruct")
    [model] = reg.list_models(adapters.docs)
    assert model["name"] == NAME and model["versions"] == ["2.1", "1.1"]
    assert model["latest"]["version"] == "2.1" and model["latest"]["aliases"] == ["production", "staging"]
    with pytest.raises(reg.RegistryError, match=r"has no version '1.9'; its versions: 1.1, 2.1"):
        reg.get_version(adapters.docs, NAME, "1.9")
    with pytest.raises(reg.RegistryError, match="unknown alias 'prod'") as exc:
        reg.promote(adapters.docs, adapters.bus, NAME, "1.1", alias="prod", caller=admin("ann"))
    assert exc.value.status == 400


def test_a_reevaluation_that_errors_again_is_unevaluated_again_until_a_verdict_decides(adapters):
    add(adapters, "r1")
    version = errored(adapters, "r2")
    assert (status(adapters, version), production(adapters)) == ("unevaluated", "1.1")
    [registered] = published(adapters)
    assert (registered.type, registered.status, registered.change) == ("ModelRegistered", "unevaluated", 0)

    doc = reg.reevaluate(adapters.docs, adapters.bus, NAME, version, caller=admin("ann"))
    assert doc["status"] == "evaluating" and doc["history"][-1]["actor"] == "ann"
    [request] = requests(adapters)
    assert (request.reevaluation, request.event_id) == (1, "r2:TrainingCompleted:reevaluation-1")
    assert request.model_dump(exclude={"reevaluation"}) == ev.TrainingCompleted.model_validate(
        doc["evaluation_request"]).model_dump(exclude={"reevaluation"})
    assert published(adapters) == []   # who asked is in the version's history
    # Asking again while it is evaluated: the same request again (a retry after a crash needs it).
    reg.reevaluate(adapters.docs, adapters.bus, NAME, version, caller=admin("bob"))
    assert [r.event_id for r in requests(adapters)] == [request.event_id]
    assert len(reg.get_version(adapters.docs, NAME, version)["history"]) == 2

    # A stale error (the first evaluation's) changes nothing; this re-evaluation's makes it unevaluated again.
    errored(adapters, "r2", reevaluation=0)
    assert status(adapters, version) == "evaluating" and published(adapters) == [registered]
    errored(adapters, "r2", reevaluation=1)
    assert status(adapters, version) == "unevaluated"
    [again] = published(adapters)
    assert (again.status, again.change) == ("unevaluated", 2) and again.event_id != registered.event_id
    doc = reg.reevaluate(adapters.docs, adapters.bus, NAME, version, caller=admin("ann"))
    assert doc["reevaluations"] == 2 and requests(adapters)[0].event_id == "r2:TrainingCompleted:reevaluation-2"

    # The verdict is the gate's, whatever it is: failed, quarantined (and then final).
    verdict = {"name": NAME, "version": version, "run_id": "r2", "uri": doc["uri"], "base_model": BASE,
               "evaluation": {"passed": False}}
    stale = reg.register_version(adapters.docs, verdict, passed=True, reasons=[], approval=False)   # the first
    assert stale[0]["status"] == "evaluating"   # evaluation's verdict, redelivered late, decides nothing
    stored, events = reg.register_version(adapters.docs, verdict, passed=False, reasons=["worse than base"],
                                          approval=False, conclusive=True,
                                          reevaluation=stored_reevaluations(adapters, version))
    assert (stored["status"], stored["registered_status"], production(adapters)) == ("quarantined", "quarantined", "1.1")
    assert [(e.type, e.change) for e in events] == [("ModelRegistered", 4), ("ModelQuarantined", 4)]
    assert reg.register_version(adapters.docs, verdict, passed=True, reasons=[], approval=False,
                                reevaluation=stored["reevaluations"]) == (stored, events)
    with pytest.raises(reg.RegistryError, match="is quarantined: only an unevaluated version") as exc:
        reg.reevaluate(adapters.docs, adapters.bus, NAME, version, caller=admin("ann"))
    assert exc.value.status == 409


def test_an_unevaluated_version_may_be_quarantined_by_hand_but_not_archived_or_exported(adapters, tmp_path):
    from shared.domain.model_export import export_version

    version = errored(adapters, "r1")
    with pytest.raises(reg.RegistryError, match="or quarantine it"):
        reg.archive(adapters.docs, adapters.bus, NAME, version, caller=admin("ann"), reason="tidy")
    with pytest.raises(reg.RegistryError, match="unevaluated: the gate has not decided on it") as exc:
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "out")
    assert exc.value.status == 409
    doc = reg.quarantine(adapters.docs, adapters.bus, NAME, version, caller=admin("ann"), reason="the adapter is corrupt")
    assert doc["status"] == "quarantined"
    with pytest.raises(reg.RegistryError, match="only an unevaluated version"):
        reg.reevaluate(adapters.docs, adapters.bus, NAME, version, caller=admin("ann"))


# ------------------------------------------------------------------ ftpipe models


@pytest.fixture
def state(tmp_path, monkeypatch, adapters):
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_LOG_LEVEL", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FTPIPE_STATE", str(adapters.settings.state_dir))
    monkeypatch.setenv("USER", "carol")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level   # main() configures logging
    yield adapters
    root.handlers[:], root.level = handlers, level


def test_models_commands(state, capsys):
    add(state, "r1")
    add(state, "r2", approval=True)
    assert main(["models", "--json"]) == 0   # no action: list
    assert [(v["version"], v["status"]) for v in json.loads(capsys.readouterr().out)] == [
        ("1.2", "candidate"), ("1.1", "promoted")]
    assert main(["models", "approve", NAME, "1.2", "--note", "ok"]) == 0
    assert "1.2 approved by token:stack; now in production" in capsys.readouterr().err   # the stack's own token
    assert main(["models", "rollback", NAME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1.1"
    assert main(["tokens", "create", "dave", "--role", "approver", "--tenant", "default"]) == 0
    dave = capsys.readouterr().out.strip()
    assert main(["models", "promote", NAME, "1.2", "--token", dave]) == 0
    assert f"{NAME} production → 1.2" in capsys.readouterr().err
    assert main(["models", "archive", NAME, "1.1", "--reason", "retired"]) == 0
    assert main(["models", "show", NAME]) == 0
    shown = capsys.readouterr().out
    assert "production → 1.2" in shown and "1.x: fine-tunes of tiny-random-smollm2" in shown
    assert "1.1 → 1.2  (manual, by token:dave)" in shown
    assert main(["models", "list", NAME, "--json"]) == 0
    assert {v["version"]: v["status"] for v in json.loads(capsys.readouterr().out)} == {"1.1": "archived",
                                                                                        "1.2": "promoted"}
    for argv, message in [(["models", "promote", NAME, "7.7"], "has no version '7.7'"),
                          (["models", "show", "nope"], f"no model 'nope'; registered models: {NAME}"),
                          (["models", "list", "nope"], "no model 'nope'"),
                          (["models", "approve", NAME, "1.1"], "does not wait for approval"),
                          (["models", "archive", NAME, "1.2", "--reason", "x"], "is in production: roll back")]:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err


def test_models_reevaluate_command(state, capsys):
    errored(state, "r1")
    assert main(["models", "show", NAME, "1.1"]) == 0
    assert "1.1 is unevaluated (evaluation errored: OSError: [Errno 5] Input/output error)" in capsys.readouterr().out
    assert main(["models", "promote", NAME, "1.1"]) == 2
    assert f"`ftpipe models reevaluate {NAME} 1.1`" in capsys.readouterr().err
    assert main(["models", "reevaluate", NAME, "1.1"]) == 0
    assert f"{NAME} 1.1 evaluating: evaluation 1 asked for" in capsys.readouterr().err
    assert reg.get_version(state.docs, NAME, "1.1")["history"][-1]["actor"] == "token:stack"
    add(state, "r2")
    assert main(["models", "reevaluate", NAME, "1.2"]) == 2
    assert "1.2 is promoted: only an unevaluated version" in capsys.readouterr().err


@pytest.fixture(params=["sqlite", "firestore"])
def any_docs(request, tmp_path, adapters):
    """The registry's documents on each DocStore adapter (the emulator's Firestore where it is installed)."""
    if request.param == "sqlite":
        yield adapters.docs
        return
    from tests.emulators import make_firestore_docs

    docs = make_firestore_docs(request.getfixturevalue("firestore_emulator"))
    yield docs
    docs.close()


def test_the_lifecycle_on_every_document_store(adapters, any_docs):
    """Version maps keyed by "1.2" and run ids, alias histories, transactions that read after they
    write: the same on Firestore as on SQLite."""
    on = type("Adapters", (), {"docs": any_docs, "bus": adapters.bus})()
    add(on, "run.1")
    candidate = add(on, "run.2", approval=True)
    add(on, "run.3", base="smollm2-135m-instruct", passed=False)
    reg.approve(any_docs, adapters.bus, NAME, candidate, caller=admin("ann"))
    assert reg.rollback(any_docs, adapters.bus, NAME, caller=admin("ann"))["version"] == "1.1"
    reg.archive(any_docs, adapters.bus, NAME, candidate, caller=admin("ann"), reason="retired")
    model = reg.get_model(any_docs, NAME)
    assert model["runs"] == {"run.1": "1.1", "run.2": "1.2", "run.3": "2.1"}
    assert model["aliases"] == {"production": "1.1"}
    assert [e["version"] for e in model["alias_history"]["production"]] == ["1.1", "1.2", "1.1"]
    assert [(v["version"], v["status"]) for v in model["versions"]] == [
        ("2.1", "quarantined"), ("1.2", "archived"), ("1.1", "promoted")]
