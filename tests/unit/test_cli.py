"""The `ftpipe` CLI on a local state folder: misuse exits 2 with a message that says what to fix (never
a traceback), every --help works, dead letters are listed without being consumed and replayed, and
`cancel` stops a running run at the services' next check."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.cli import build_parser, main
from shared.domain import events as ev
from shared.domain.recipe import Recipe, available_recipes
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import CANCELLATIONS, handle_message, publish_event

FTPIPE = Path(sys.executable).with_name("ftpipe")
RECIPE = Recipe(name="tiny-sft", version=1, base_model="tiny-random-smollm2", model_name="tiny-sft")


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A working folder with a few job files, and a state folder the CLI uses through $FTPIPE_STATE."""
    for var in ("FTPIPE_PROFILE", "FTPIPE_BUCKET", "FTPIPE_LOG_LEVEL", "FTPIPE_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FTPIPE_STATE", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    files = {
        "data.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
        "list.yaml": "- recipe: tiny-sft\n- dataset: data.jsonl\n",
        "broken.yaml": "recipe: [tiny-sft\n",
        "nodata.yaml": "recipe: tiny-sft\n",
        "unknown.yaml": "recipe: tiny-sft\ndataset: data.jsonl\nepochs: 3\n",
        "badoverrides.yaml": "recipe: tiny-sft\ndataset: data.jsonl\noverrides: 3\n",
        "badfield.yaml": "recipe: tiny-sft\ndataset: data.jsonl\noverrides: {training.epochz: 1}\n",
        "badtenant.yaml": "recipe: tiny-sft\ndataset: data.jsonl\ntenant: [a, b]\n",
        "baddataset.yaml": "recipe: tiny-sft\ndataset: {path: data.jsonl}\n",
        "badrunid.yaml": "recipe: tiny-sft\ndataset: data.jsonl\nrun_id: ../../etc\n",
        "missingdata.yaml": "recipe: tiny-sft\ndataset: missing.jsonl\n",
        "badrecipe.yaml": "recipe: nope\ndataset: data.jsonl\n",
        "handmade.yaml": "recipe: tiny-sft\ndataset: handmade\nprepared: true\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "handmade").mkdir()  # splits written by hand: no manifest, no PII report
    for split in ("train", "val", "test"):
        (tmp_path / "handmade" / f"{split}.jsonl").write_text(files["data.jsonl"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level   # main() configures logging
    yield tmp_path
    root.handlers[:], root.level = handlers, level


KNOWN = ", ".join(available_recipes())
MISUSE = [
    (["drop", "missing.jsonl", "--recipe", "tiny-sft"], "missing.jsonl: no such file"),
    (["drop", "data.jsonl", "--recipe", "nope"], "recipe 'nope' not found"),
    (["drop", "data.jsonl", "--recipe", "nope"], f"known recipes: {KNOWN}"),
    (["drop", "data.jsonl", "--recipe", "mine.yaml"], "recipe file mine.yaml does not exist"),
    (["drop", "odd[bold]name.jsonl", "--recipe", "tiny-sft"], "odd[bold]name.jsonl: no such file"),
    (["submit", "missing.yaml"], "missing.yaml: no such job file"),
    (["submit", "list.yaml"], "list.yaml: a job file is a mapping with recipe and dataset"),
    (["submit", "broken.yaml"], "broken.yaml: not valid YAML"),
    (["submit", "nodata.yaml"], "job file: 'dataset' is required"),
    (["submit", "unknown.yaml"], "job file: unknown keys ['epochs']; allowed: recipe, dataset"),
    (["submit", "badoverrides.yaml"], "'overrides' must be a mapping"),
    (["submit", "badfield.yaml"], "override 'training.epochz': unknown field 'epochz'"),
    (["submit", "badtenant.yaml"], "'tenant' must be a string"),
    (["submit", "baddataset.yaml"], "'dataset' must be a string"),
    (["submit", "badrunid.yaml"], "run_id '../../etc' must be"),
    (["submit", "missingdata.yaml"], "missing.jsonl: no such file"),
    (["submit", "badrecipe.yaml"], "recipe 'nope' not found"),
    (["submit", "handmade.yaml"], "handmade: the prepared dataset lacks manifest.json, pii_report.json: a prepared "
                                  "dataset is what `ftpipe prepare FILE --recipe R --out DIR` writes"),
    (["status", "run-nope"], "no run run-nope; `ftpipe runs` lists them"),
    (["watch", "run-nope"], "no run run-nope"),
    (["cancel", "run-nope"], "no run run-nope; `ftpipe runs` lists them"),
    (["dlq", "list", "--topic", "nope"], f"unknown topic 'nope'; topics: {', '.join(ev.TOPICS)}"),
    (["dlq", "replay", "--topic", "nope"], "unknown topic 'nope'"),
    (["prepare", "missing.jsonl", "--recipe", "tiny-sft", "--out", "out"], "missing.jsonl: no such file"),
    (["prepare", "data.jsonl", "--recipe", "nope", "--out", "out"], "recipe 'nope' not found"),
    (["train", "--recipe", "tiny-sft", "--data", "nodir", "--out", "out"], "nodir: prepared dataset must be a folder"),
    (["evaluate", "--recipe", "tiny-sft", "--data", "nodir", "--adapter", "a"], "nodir: prepared dataset must be a folder"),
]


@pytest.mark.parametrize("argv, message", MISUSE, ids=[" ".join(a) + f" [{i}]" for i, (a, _) in enumerate(MISUSE)])
def test_misuse_exits_2_with_a_message(state, capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    if "YAML" not in message:  # the YAML parser's own message points at the spot over several lines
        assert "\n" not in captured.err.rstrip("\n")   # one line, not wrapped mid-sentence
    assert "Traceback" not in captured.err and captured.out == ""


def test_misuse_through_the_installed_command(state):
    """The console script itself: exit status 2, the message on stderr, no traceback."""
    for argv, message in [(["drop", "missing.jsonl", "--recipe", "tiny-sft"], "missing.jsonl: no such file"),
                          (["submit", "badoverrides.yaml"], "'overrides' must be a mapping"),
                          (["status"], "the following arguments are required: run")]:
        proc = subprocess.run([str(FTPIPE), *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return list(action.choices)


def test_every_subcommand_is_covered_by_the_help_test():
    assert set(subcommands()) >= {"up", "down", "drop", "submit", "status", "watch", "cancel", "runs", "models",
                                  "dlq", "prepare", "train", "evaluate", "demo"}


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help(state, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ftpipe {command or ''}".rstrip())
    assert "--state" in out if command else "COMMAND" in out


def test_help_of_the_installed_command():
    proc = subprocess.run([str(FTPIPE), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: ftpipe" in proc.stdout
    for command in ("drop", "submit", "dlq", "cancel"):
        assert command in proc.stdout


# ------------------------------------------------------------------ dead letters

def cli(state: Path, *argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(FTPIPE), *argv, "--state", str(state / "state")], capture_output=True, text=True,
                          timeout=120, cwd=state)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def adapters(state):
    a = bootstrap(Settings(state_dir=state / "state", min_backoff_s=0.1, max_backoff_s=0.2))
    yield a
    a.close()


def dead_letter_poison(adapters, data: bytes, attributes: dict) -> None:
    """Publish a poison job; the preprocess service dead-letters it, and the runtime's
    MessageDeadLettered notice goes to the tracker on `notices`, not back on `jobs`."""
    from services.preprocess.service import SERVICE

    adapters.bus.publish(ev.JOBS, data, attributes)
    [msg] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=5)
    assert handle_message(SERVICE, adapters, ev.JOBS, msg) == "dead-lettered"
    assert adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=1) == []
    [notice] = adapters.bus.pull(ev.subscription_name("tracker", ev.NOTICES), timeout_s=5)
    assert notice.attributes["type"] == "MessageDeadLettered"


def test_dead_letters_are_listed_without_being_consumed_then_replayed(state, adapters):
    attributes = {"type": "JobSubmitted", "schema_version": "1", "run_id": "run-poison"}
    dead_letter_poison(adapters, b'{"recipe": "tiny-sft", "dataset": ', attributes)

    # Twice (every topic, then only jobs'): listing does not consume.
    for argv in (["dlq", "list", "--json"], ["dlq", "list", "--topic", "jobs", "--json"]):
        proc = cli(state, *argv)
        assert proc.returncode == 0, proc.stderr
        [row] = json.loads(proc.stdout)
        assert row["topic"] == "jobs" and row["type"] == "JobSubmitted" and row["run_id"] == "run-poison"
        assert row["reason"].startswith("malformed: body is not valid JSON")
        assert row["source"] == "preprocess.jobs"

    proc = cli(state, "dlq", "replay", "--topic", "jobs", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["run_id"] for r in json.loads(proc.stdout)] == ["run-poison"]

    # Back on `jobs` as it was published, addressed to the subscription that dead-lettered it.
    [again] = adapters.bus.pull(ev.subscription_name("preprocess", ev.JOBS), timeout_s=5)
    assert again.data == b'{"recipe": "tiny-sft", "dataset": '
    assert dict(again.attributes) == {**attributes, "replay_for": "preprocess.jobs"}
    again.ack()
    # The topic's other subscribers receive the copy too, and leave it alone.
    from services.trainer.service import SERVICE as TRAINER

    [copy] = adapters.bus.pull(ev.subscription_name("trainer", ev.JOBS), max_messages=5, timeout_s=5)[-1:]
    assert handle_message(TRAINER, adapters, ev.JOBS, copy) == "ignored"
    proc = cli(state, "dlq", "list", "--topic", "jobs")
    assert proc.returncode == 0 and "no dead-lettered messages" in proc.stderr


def test_a_prepared_job_without_manifest_fails_before_training(state, adapters):
    """Published straight onto `jobs` (past the CLI's check): the trainer ends the run with the reason
    instead of training a model the registry could never bundle."""
    from shared.platform.storage import upload_dir

    from services.trainer.service import SERVICE as TRAINER

    upload_dir(adapters.store, state / "handmade", "ftpipe", "uploads/handmade")
    uri = adapters.store.url("ftpipe", "uploads/handmade/")
    publish_event(adapters.bus, ev.JobSubmitted(run_id="run-handmade", recipe=RECIPE, dataset_uri=uri, prepared=True))
    [msg] = adapters.bus.pull(ev.subscription_name("trainer", ev.JOBS), timeout_s=5)
    assert handle_message(TRAINER, adapters, ev.JOBS, msg) == "acked"
    [out] = adapters.bus.pull(ev.subscription_name("tracker", ev.TRAINING), max_messages=5, timeout_s=5)
    failed = ev.decode(out.data, out.attributes)
    assert failed.type == "TrainingFailed" and "lacks manifest.json, pii_report.json" in failed.reason
    assert not list(adapters.store.list("ftpipe", "runs/run-handmade/"))


def test_replay_of_one_message_leaves_the_others(state, adapters):
    for run_id in ("run-1", "run-2"):
        dead_letter_poison(adapters, b"not json", {"type": "JobSubmitted", "schema_version": "1", "run_id": run_id})
    listed = json.loads(cli(state, "dlq", "list", "--topic", "jobs", "--json").stdout)
    assert sorted(r["run_id"] for r in listed) == ["run-1", "run-2"]
    first = next(r for r in listed if r["run_id"] == "run-1")

    proc = cli(state, "dlq", "replay", "--topic", "jobs", "--message-id", first["message_id"], "--json")
    assert [r["run_id"] for r in json.loads(proc.stdout)] == ["run-1"]
    assert [r["run_id"] for r in json.loads(cli(state, "dlq", "list", "--topic", "jobs", "--json").stdout)] == ["run-2"]


# ------------------------------------------------------------------ cancel

def test_cancel_marks_a_running_run_and_later_events_are_skipped(state, adapters):
    from services.registry_fn.service import SERVICE as REGISTRY
    from services.tracker.lineage import RUNS, record

    run_id = "run-cancel"
    for event in (ev.JobSubmitted(run_id=run_id, recipe=RECIPE, dataset_uri="file:///in.jsonl"),
                  ev.DatasetPrepared(run_id=run_id, recipe=RECIPE, dataset_id="d", dataset_uri="file:///d/",
                                     counts={"train": 8}),
                  ev.TrainingStarted(run_id=run_id, dataset_uri="file:///d/")):
        record(adapters.docs, event)
    assert adapters.docs.get(RUNS, run_id)["status"] == "running"

    proc = cli(state, "cancel", run_id)
    assert proc.returncode == 0, proc.stderr
    assert f"run {run_id}: cancelled" in proc.stderr
    run = adapters.docs.get(RUNS, run_id)
    assert run["status"] == "cancelled" and run["error"] == "cancelled by request"
    assert adapters.docs.get(CANCELLATIONS, run_id) is not None
    status = json.loads(cli(state, "status", run_id, "--json").stdout)
    assert status["status"] == "cancelled"

    # A later event of the run (the evaluation of a model trained before the cancel) is skipped.
    publish_event(adapters.bus, ev.EvaluationCompleted(
        run_id=run_id, recipe=RECIPE, dataset_uri="file:///d/", adapter_uri=adapters.store.url("ftpipe", "runs/x/adapter/"),
        scores={}, passed=True, reasons=[], report_uri="file:///r/"))
    [msg] = adapters.bus.pull(ev.subscription_name("registry", ev.EVALUATIONS), timeout_s=5)
    assert handle_message(REGISTRY, adapters, ev.EVALUATIONS, msg) == "cancelled"
    assert adapters.docs.query("model_versions") == []
    assert adapters.bus.pull(ev.subscription_name("registry", ev.EVALUATIONS), timeout_s=0.2) == []  # acked

    # A run that has ended cannot be cancelled again.
    proc = cli(state, "cancel", run_id)
    assert proc.returncode == 2 and f"run {run_id} already ended (cancelled)" in proc.stderr


def test_recipes_list_show_validate(tmp_path, capsys):
    assert main(["recipes", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-sft"]["data_kind"] == "chat" and len(rows["tiny-sft"]["hash"]) == 16
    assert main(["recipes", "show", "tiny-sft", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["hash"] == rows["tiny-sft"]["hash"] and shown["training"]["batch_size"] >= 1  # defaults filled in
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad\nversion: 1\nbase_model: m\nmodel_name: x\ntraining: {epochz: 2}\n")
    assert main(["recipes", "validate", "tiny-sft", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "valid  tiny-sft" in captured.out
    assert "name: String should match pattern" in captured.err and "training.epochz: Extra inputs" in captured.err
    assert main(["recipes", "show"]) == 2
