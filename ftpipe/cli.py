"""The `ftpipe` command line."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape

from shared.platform.config import Settings

# soft_wrap: long paths and URLs stay whole on one line (copyable) rather than folding at 80 columns.
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class UsageError(Exception):
    pass


def _settings(args) -> Settings:
    overrides = {}
    if getattr(args, "state", None):
        overrides["state_dir"] = Path(args.state)
    if getattr(args, "profile", None):
        overrides["profile"] = args.profile
    return Settings.from_env(**overrides)


def _client(args):
    from ftpipe.client import Client

    return Client(_settings(args), token=getattr(args, "token", None))


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------ stack
def cmd_up(args) -> int:
    from ftpipe.stack import dashboard_url, tracker_url, up

    settings = _settings(args)
    with err.status("starting the local stack…"):
        procs = up(settings)
    err.print(f"[green]up[/green]: {', '.join(f'{n} (pid {p})' for n, p in procs.items())}")
    err.print(f"state: {settings.state_dir}   logs: {settings.state_dir / 'logs'}   API: {tracker_url(settings)}")
    err.print(f"dashboard: {escape(dashboard_url(settings))}")
    return 0


def cmd_dashboard(args) -> int:
    from ftpipe.stack import dashboard_url

    url = dashboard_url(_settings(args))
    print(url)
    if args.open:
        import webbrowser

        if not webbrowser.open(url):
            err.print("no browser to open here: copy the link above")
    return 0


def cmd_down(args) -> int:
    from ftpipe.stack import down

    stopped = down(_settings(args))
    err.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


# ------------------------------------------------------------------ runs
def cmd_drop(args) -> int:
    if args.dry_run:
        return _dry_run(args)
    client = _client(args)
    run_id = client.drop(args.file, args.recipe, tenant=args.tenant, legal_basis=args.legal_basis)
    err.print(f"dropped {escape(args.file)} → run [bold]{run_id}[/bold]")
    if not args.wait:
        print(run_id)
        return 0
    return _wait_and_report(client, run_id, args)


def _dry_run(args) -> int:
    """`drop --dry-run`: the preprocess stage in-process into a temporary folder; nothing uploaded.
    A recipe whose memory plan does not fit its hardware is refused first, as a drop would be."""
    import tempfile

    from ftpipe.standalone import prepare_file
    from shared.domain.memory_plan import refusal
    from shared.domain.recipe import load_recipe

    if reason := refusal(load_recipe(args.recipe)):
        _print_json({"dry_run": True, "refused": True, "reason": reason}) if args.json else \
            err.print(f"[red]refused[/red]: {escape(reason)}", soft_wrap=True)
        return 1

    with tempfile.TemporaryDirectory(prefix="ftpipe-dry-run-") as tmp:
        result = prepare_file(args.file, args.recipe, tmp, legal_basis=args.legal_basis)
    result = {k: v for k, v in result.items() if k not in ("files", "out_dir")}
    result["dry_run"] = True
    if args.json:
        _print_json(result)
    else:
        _print_prepared(result, "dry run, nothing uploaded")
    return 1 if result["rejected"] else 0


def _print_prepared(result: dict, where: str) -> None:
    from services.preprocess.cost import describe

    out.print(f"{'[red]rejected[/red]: ' + escape(result['reason']) if result['rejected'] else '[green]prepared[/green]'} "
              f"→ {escape(where)}\n  " + ", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    if not result["rejected"]:
        out.print("  " + escape(describe(result.get("tokens"), result.get("cost_estimate"))).replace("\n", "\n  "))


def cmd_submit(args) -> int:
    path = Path(args.job)
    if not path.is_file():
        raise UsageError(f"{args.job}: no such job file")
    try:
        job = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{args.job}: not valid YAML: {exc}") from exc
    if not isinstance(job, dict):
        raise UsageError(f"{args.job}: a job file is a mapping with recipe and dataset")
    if isinstance(job.get("dataset"), str) and job["dataset"] and "://" not in job["dataset"]:
        job["dataset"] = str((path.parent / job["dataset"]).resolve()) if not Path(job["dataset"]).is_absolute() else job["dataset"]
    client = _client(args)
    run_id = client.submit(job)
    err.print(f"submitted → run [bold]{run_id}[/bold]")
    if not args.wait:
        print(run_id)
        return 0
    return _wait_and_report(client, run_id, args)


def _wait_and_report(client, run_id: str, args) -> int:
    from ftpipe.progress import watch

    run = watch(client, run_id, timeout_s=args.timeout, console=err)
    if args.json:
        _print_json(run_record(run))
    else:
        print_run(run)
    return 0 if run.get("status") == "succeeded" else 1


def run_record(run: dict) -> dict:
    """The documented shape of `--json` output for a run."""
    evaluation = run.get("evaluation", {})
    return {
        "run_id": run.get("run_id"), "status": run.get("status"), "sub_state": run.get("sub_state"),
        "error": run.get("error"), "recipe": run.get("recipe"),
        "dataset": run.get("dataset", {}), "final_metrics": run.get("final_metrics", {}),
        "eval": {"scores": evaluation.get("scores", {}), "passed": evaluation.get("passed"),
                 "reasons": evaluation.get("reasons", [])},
        "gate": None if "passed" not in evaluation else ("passed" if evaluation["passed"] else "failed"),
        "model": run.get("model"),
        "artefacts": {"input": run.get("input_uri"), "dataset": run.get("dataset", {}).get("uri"),
                      "adapter": run.get("adapter_uri"), "evaluation_report": evaluation.get("report_uri"),
                      "model": (run.get("model") or {}).get("uri"),
                      "checkpoints": [c["uri"] for _, c in sorted(run.get("checkpoints", {}).items(), key=lambda kv: int(kv[0]))]},
    }


def print_run(run: dict) -> None:
    rec = run_record(run)
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(rec["status"], "cyan")
    out.print(f"run [bold]{rec['run_id']}[/bold]: [{colour}]{rec['status']}[/{colour}] ({rec['sub_state']})")
    if rec["error"]:
        out.print(f"  error: {rec['error']}")
    if rec["recipe"]:
        out.print(f"  recipe: {rec['recipe']['name']} v{rec['recipe']['version']}")
    counts = rec["dataset"].get("counts")
    if counts:
        out.print("  data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if rec["final_metrics"]:
        out.print("  training: " + ", ".join(f"{k} {v:.4g}" for k, v in rec["final_metrics"].items()))
    scores = rec["eval"]["scores"]
    if scores:
        for metric in sorted(scores.get("candidate", {})):
            out.print(f"  eval {metric}: base {scores.get('base', {}).get(metric, float('nan')):.4g} → "
                      f"candidate {scores['candidate'][metric]:.4g}")
        out.print(f"  gate: {rec['gate']}")
        for reason in rec["eval"]["reasons"]:
            out.print(f"    - {reason}")
    if rec["model"]:
        out.print(f"  model: {rec['model']['name']} {rec['model']['version']} ({rec['model']['status']}) at {rec['model']['uri']}")


def cmd_status(args) -> int:
    run = _client(args).run(args.run)
    if run is None:
        raise UsageError(f"no run {args.run}; `ftpipe runs` lists them")
    _print_json(run_record(run)) if args.json else print_run(run)
    return 0


def cmd_watch(args) -> int:
    from ftpipe.progress import watch

    client = _client(args)
    if client.run(args.run) is None:
        raise UsageError(f"no run {args.run}; `ftpipe runs` lists them")
    run = watch(client, args.run, timeout_s=args.timeout, console=err)
    print_run(run)
    return 0


def cmd_cancel(args) -> int:
    run = _client(args).cancel(args.run)
    err.print(f"run {args.run}: {run.get('status')} (services stop at their next check; the trainer checkpoints first)")
    return 0


def cmd_runs(args) -> int:
    runs = _client(args).runs(status=args.status, limit=args.limit)
    if args.json:
        _print_json([run_record(r) for r in runs])
        return 0
    from rich.table import Table

    table = Table("run", "status", "stage", "recipe", "progress", "model")
    for r in runs:
        model = r.get("model") or {}
        progress = r.get("training", {}).get("progress")
        table.add_row(r["run_id"], r.get("status", ""), r.get("sub_state", ""), (r.get("recipe") or {}).get("name", ""),
                      f"{progress:.0%}" if progress is not None else "", f"{model.get('version', '')} {model.get('status', '')}")
    out.print(table)
    return 0


def cmd_models(args) -> int:
    """The model registry (shared/domain/model_registry.py): list, show, and the changes people make."""
    client = _client(args)
    action = getattr(args, "action", None) or "list"
    if action == "list":
        return _models_list(client, args)
    if action == "show":
        return _models_show(client, args)
    if action == "export":
        result = client.export_model(args.name, args.version, args.out, merged=not args.no_merged,
                                     adapter=not args.no_adapter)
        _print_json(result) if args.json else err.print(escape(
            f"{args.name} {args.version} exported to {args.out}: "
            + ", ".join(f"{kind} {result[kind]}" for kind in ("merged", "adapter") if kind in result)))
        return 0
    if action == "policy":
        return _models_policy(client, args)
    actor = client.caller.subject
    if action == "approve":
        doc = client.approve_model(args.name, args.version, note=args.note or "")
        message = (f"{args.name} {args.version} approved by {actor}; "
                   + ("now in production" if "production" in doc["aliases"] else
                      f"not moved to production, where a later version is (`ftpipe models promote {args.name} "
                      f"{args.version}` puts it there anyway)"))
    elif action == "promote":
        doc = client.promote_model(args.name, args.version, alias=args.alias)
        message = f"{args.name} {args.alias} → {args.version}"
    elif action == "rollback":
        doc = client.rollback_model(args.name, alias=args.alias, to=args.to)
        message = f"{args.name} {args.alias} rolled back → {doc['version']}"
    elif action == "seal":
        doc = client.seal_model(args.name, args.version)
        sealed = doc.get("sealed")
        message = (f"{args.name} {args.version}: the registry holds the digests of bundle.json and "
                   f"{len(doc['adapter_files'])} adapter file(s) ("
                   + (f"sealed by {sealed['actor']}" if sealed else "recorded at registration, the bucket matches them")
                   + "); serving and export use exactly these bytes")
    elif action == "reevaluate":
        doc = client.reevaluate_model(args.name, args.version)
        message = (f"{args.name} {args.version} {doc['status']}: evaluation {doc['reevaluations']} asked for; "
                   f"`ftpipe models show {args.name}` shows the verdict once the evaluator gives it")
    else:  # archive, quarantine
        change = client.archive_model if action == "archive" else client.quarantine_model
        doc = change(args.name, args.version, reason=args.reason)
        message = f"{args.name} {args.version} {doc['status']}"
    _print_json(doc) if args.json else err.print(escape(message))
    return 0


def _models_policy(client, args) -> int:
    """`ftpipe models policy NAME [changes]`: show the policy, or change it (an admin's)."""
    from shared.domain.recipe import GateRule

    changes = {}
    if args.owner:
        changes["owners"] = tuple(args.owner)
    for field in ("approval_required", "four_eyes", "privacy_review", "llm_judge"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.lock is not None:
        changes["locked_suites"] = tuple(s for s in args.lock.split(",") if s)
    if args.gate:
        current = client.model_policy(args.name) or {}
        gate = dict(current.get("gate") or {})
        for spec in args.gate:
            metric, _, rule = spec.partition("=")
            try:
                gate[metric] = GateRule.model_validate(json.loads(rule)).model_dump(mode="json")
            except ValueError as exc:
                raise UsageError(f"--gate {spec!r}: METRIC='{{\"tolerance\": 0.02, \"relative\": true}}' ({exc})") from exc
        changes["gate"] = gate
    policy = client.set_model_policy(args.name, **changes) if changes else client.model_policy(args.name)
    if policy is None:
        raise UsageError(f"model {args.name!r} has no policy; an admin sets one: ftpipe models policy {args.name} "
                         "--owner TENANT")
    if args.json:
        _print_json(policy)
    else:
        out.print(escape(f"{args.name}: owners {', '.join(policy['owners'])}; approval "
                         f"{'required' if policy['approval_required'] else 'not required'}; four eyes "
                         f"{'on' if policy['four_eyes'] else 'off'}; privacy review "
                         f"{'required' if policy['privacy_review'] else 'not required'}; LLM judge "
                         f"{'allowed' if policy.get('llm_judge', True) else 'forbidden'}; locked suites "
                         f"{', '.join(policy['locked_suites']) or 'none'}; gate floors "
                         f"{json.dumps(policy['gate']) if policy['gate'] else 'none'}"))
    return 0


def _held(row: dict) -> str:
    """What a token or principal holds, e.g. "approver, viewer in team-a; submitter in team-b"."""
    if row["admin"]:
        return "admin"
    return "; ".join(f"{', '.join(roles)} in {tenant}" for tenant, roles in row["grants"].items()) or "no roles"


def _print_rows(args, rows: list[dict], line) -> int:
    _print_json(rows) if args.json else [out.print(escape(line(row))) for row in rows]
    return 0


def cmd_tokens(args) -> int:
    """`ftpipe tokens create|list|revoke` (an admin's): named local tokens, stored hashed."""
    client = _client(args)
    if args.action == "list":
        return _print_rows(args, client.tokens(), lambda t: f"{t['name']}  {_held(t)}  (created by {t['created_by']})")
    if not args.name:
        raise UsageError(f"tokens {args.action} needs a NAME")
    if args.action == "revoke":
        client.revoke_token(args.name)
        err.print(f"token {escape(args.name)} revoked")
        return 0
    if not args.role:
        raise UsageError("tokens create needs --role viewer|submitter|approver|admin (and --tenant T but for admin)")
    try:
        secret = client.create_token(args.name, args.role, args.tenant)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    err.print(f"token {escape(args.name)} ({args.role}{' in ' + args.tenant if args.tenant else ''}): shown once, "
              "stored only as its hash; give it as FTPIPE_TOKEN or --token")
    print(secret)
    return 0


def cmd_roles(args) -> int:
    """`ftpipe roles grant|revoke|list` (an admin's): roles of people, service accounts and tokens."""
    client = _client(args)
    if args.action == "list":
        return _print_rows(args, client.principals(), lambda p: f"{p['subject']}  {_held(p)}")
    if not args.subject or not args.role:
        raise UsageError(f"roles {args.action} needs SUBJECT and --role (and --tenant T but for admin)")
    change = client.grant if args.action == "grant" else client.revoke
    try:
        doc = change(args.subject, args.role, args.tenant)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _print_json(doc) if args.json else err.print(escape(f"{args.subject}: {args.action} {args.role}"
                                                         + (f" in {args.tenant}" if args.tenant else "")))
    return 0


def _models_list(client, args) -> int:
    name = getattr(args, "name", None)
    models = client.models(name)
    if name and not models:
        client.model(name)  # says which models exist
    if args.json:
        _print_json(models)
        return 0
    from rich.table import Table

    table = Table("model", "version", "status", "aliases", "run", "uri")
    for m in models:
        table.add_row(m["name"], m["version"], m["status"], ",".join(m.get("aliases", [])), m["run_id"], m["uri"])
    out.print(table)
    return 0


def _models_show(client, args) -> int:
    if args.version:
        doc = client.model_version(args.name, args.version)
        if args.json:
            _print_json(doc)
        elif doc["model_card"] is None:  # no verdict, so no bundle yet
            entry = (doc.get("history") or [{}])[-1]
            out.print(escape(f"{args.name} {args.version} is {doc['status']} ({entry.get('reason')}): no model card "
                             f"until the gate decides; `ftpipe models reevaluate {args.name} {args.version}`"))
        else:
            out.print(escape(doc["model_card"]))
        return 0
    model = client.model(args.name)
    if args.json:
        _print_json(model)
        return 0
    out.print(escape(f"{model['name']}: " + (", ".join(f"{a} → {v}" for a, v in sorted(model.get("aliases", {}).items()))
                                             or "no aliases")))
    for line in model.get("lineages", []):
        out.print(escape(f"  {line['major']}.x: fine-tunes of {line['base_model']}"))
    for v in model["versions"]:
        score = (v.get("evaluation") or {}).get("passed")
        out.print(escape(f"  {v['version']:>6}  {v['status']:<11} {','.join(v['aliases']):<18} run {v['run_id']}  gate "
                         + {True: "passed", False: "failed", None: "?"}[score]))
    for alias, entries in sorted(model.get("alias_history", {}).items()):
        out.print(escape(f"  {alias} history:"))
        for e in entries:
            out.print(escape(f"    {e['previous'] or '-'} → {e['version'] or '-'}  ({e['reason']}"
                             + (f", by {e['actor']}" if e.get("actor") else "") + ")"))
    return 0


def cmd_dlq(args) -> int:
    client = _client(args)
    rows = client.dlq_list(args.topic) if args.action == "list" else client.dlq_replay(args.topic, args.message_id)
    if args.json:
        _print_json(rows)
    elif not rows:
        err.print("no dead-lettered messages" if args.action == "list" else "nothing replayed")
    else:
        for r in rows:
            out.print(f"{r['topic']} {r['message_id']} {r['type']} run={r['run_id']}: {r['reason']}")
        if args.action == "replay":
            err.print(f"replayed {len(rows)} message(s)")
    return 0


# ------------------------------------------------------------------ tenants
def _limit(option: str, text: str | None, kind):
    """A quota limit from the command line: a number >= 0, or `unlimited`."""
    if text is None or text == "unlimited":
        return None
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{option} {text!r}: give a {'whole ' if kind is int else ''}number >= 0, or 'unlimited'")
    return value


def _print_tenant(t: dict) -> None:
    def shown(limit):
        return "unlimited" if limit is None else f"{limit:g}"

    cost_limit = t.get("cost_usd_per_month")
    out.print(f"[bold]{escape(t['tenant'])}[/bold]  concurrent jobs {len(t['running'])} / "
              f"{shown(t['max_concurrent_jobs'])}   GPU-hours {t['month']} {t['gpu_hours_used']:g} / "
              f"{shown(t['gpu_hours_per_month'])}   cost {t['month']} ${t.get('cost_usd_used', 0):.2f} / "
              f"{'unlimited' if cost_limit is None else f'${cost_limit:g}'}")
    for run_id in t["running"]:
        out.print(f"  training: {run_id}")


def cmd_tenants(args) -> int:
    client = _client(args)
    if args.action == "list":
        rows = client.tenants()
        if args.json:
            _print_json(rows)
        elif not rows:
            err.print("no tenant has a quota (every tenant is unlimited); set one with "
                      "`ftpipe tenants set TENANT --max-concurrent N --gpu-hours-per-month H --cost-per-month USD`")
        for t in rows if not args.json else ():
            _print_tenant(t)
        return 0
    if args.action == "reindex":
        result = client.reindex_tenants()
        if args.json:
            _print_json(result)
        else:
            err.print(f"recounted {result['runs']} runs into {result['tenants']} tenant_stats documents"
                      + (f"; removed those of {', '.join(result['removed'])}" if result["removed"] else ""))
        return 0
    if not args.tenant:
        raise UsageError(f"tenants {args.action} needs a TENANT name; `ftpipe tenants list` shows those with a quota")
    if args.action == "set":
        given = [v is not None for v in (args.max_concurrent, args.gpu_hours_per_month, args.cost_per_month)]
        if args.unlimited and any(given):
            raise UsageError("tenants set --unlimited lifts every limit: give it alone, or give the limits "
                             "(a number, or 'unlimited' each)")
        if not args.unlimited and not any(given):
            raise UsageError("tenants set needs --max-concurrent N, --gpu-hours-per-month H and/or --cost-per-month "
                             "USD (a number, or 'unlimited'), or --unlimited")
        limits = {}
        if args.unlimited:
            limits = {"max_concurrent_jobs": None, "gpu_hours_per_month": None, "cost_usd_per_month": None}
        if args.max_concurrent is not None:
            limits["max_concurrent_jobs"] = _limit("--max-concurrent", args.max_concurrent, int)
        if args.gpu_hours_per_month is not None:
            limits["gpu_hours_per_month"] = _limit("--gpu-hours-per-month", args.gpu_hours_per_month, float)
        if args.cost_per_month is not None:
            limits["cost_usd_per_month"] = _limit("--cost-per-month", args.cost_per_month, float)
        row = client.set_tenant_quota(args.tenant, **limits)
    else:
        row = client.tenant(args.tenant)
    _print_json(row) if args.json else _print_tenant(row)
    return 0


# ------------------------------------------------------------------ recipes
def _recipe_row(recipe, source: str) -> dict:
    return {"name": recipe.name, "version": recipe.version, "task": recipe.task, "method": recipe.method,
            "data_kind": recipe.data_kind, "adapter": recipe.adapter.kind, "base_model": recipe.base_model,
            "hash": recipe.hash, "source": source, "description": recipe.description}


def cmd_recipes(args) -> int:
    from shared.domain.recipe import RECIPES_DIR, RecipeError, available_recipes, load_recipe

    if args.action == "list":
        rows = [_recipe_row(load_recipe(name), str(RECIPES_DIR / f"{name}.yaml")) for name in available_recipes()]
        if args.json:
            _print_json(rows)
        for r in rows if not args.json else ():
            out.print(f"[bold]{escape(r['name'])}[/bold] v{r['version']}  {r['task']} / {r['method']} / "
                      f"{r['adapter']}  on {escape(r['base_model'])}  (hash {r['hash']})")
            if r["description"]:
                out.print(f"  {escape(r['description'].strip().splitlines()[0])}")
        return 0
    if not args.recipes:
        raise UsageError(f"recipes {args.action} needs a recipe name or YAML file; `ftpipe recipes list` shows them")
    if args.action == "show":
        [ref] = args.recipes[:1]
        recipe = load_recipe(ref)
        full = {**recipe.model_dump(mode="json"), "hash": recipe.hash, "data_kind": recipe.data_kind}
        if args.json:
            _print_json(full)
        else:
            print(yaml.safe_dump(full, sort_keys=False, allow_unicode=True, width=100), end="")
        return 0
    bad = 0
    results = []
    for ref in args.recipes:  # validate: every file, each problem named
        try:
            recipe = load_recipe(ref)
            results.append({"recipe": ref, "valid": True, **_recipe_row(recipe, ref)})
            if not args.json:
                out.print(f"[green]valid[/green]  {escape(ref)}: {recipe.name} v{recipe.version} "
                          f"({recipe.data_kind} rows, hash {recipe.hash})")
        except RecipeError as exc:
            bad += 1
            results.append({"recipe": ref, "valid": False, "error": str(exc)})
            if not args.json:
                err.print(f"[red]invalid[/red] {escape(str(exc))}", soft_wrap=True)
    if args.json:
        _print_json(results)
    return 1 if bad else 0


# ------------------------------------------------------------------ stages without the bus
def cmd_prepare(args) -> int:
    from ftpipe.standalone import prepare_file

    result = prepare_file(args.file, args.recipe, args.out)
    if args.json:
        _print_json(result)
    else:
        _print_prepared(result, args.out)
    return 1 if result["rejected"] else 0


def cmd_privacy(args) -> int:
    from ftpipe import privacy

    client = _client(args)
    if args.action == "list":
        rows = privacy.awaiting(client)
        if args.json:
            _print_json(rows)
        elif not rows:
            err.print("no datasets awaiting privacy review")
        for r in rows if not args.json else ():
            recipe = r.get("recipe") or {}
            residual = r["residual_rate"]
            out.print(f"{r['run_id']}  {recipe.get('name', '?')} v{recipe.get('version', '?')}  dataset "
                      f"{r['dataset'].get('id')}  " + ", ".join(f"{k} {v}" for k, v in r["dataset"].get("counts", {}).items()))
            out.print("  PII masked: " + (", ".join(f"{k} {v}" for k, v in r["pii_counts"].items()) or "none")
                      + ("" if residual is None else f"; residual rate {residual:.4%}"))
        return 0
    if not args.run:
        raise UsageError(f"privacy {args.action} needs a RUN id; `ftpipe privacy list` shows them")
    if args.action == "approve":
        result = privacy.approve(client, args.run, args.note)
        message = f"run {args.run}: approved by {result['approver']}; training can start"
    else:
        if not args.reason:
            raise UsageError("privacy reject needs --reason TEXT")
        result = privacy.reject(client, args.run, args.reason)
        message = f"run {args.run}: rejected by {result['approver']}"
    _print_json(result) if args.json else err.print(escape(message))
    return 0


def cmd_train(args) -> int:
    if args.plan:
        return _plan(args)
    if args.render_k8s:
        return _render_k8s(args)
    if not (args.data and args.out):
        raise UsageError("ftpipe train needs --data (a prepared dataset folder) and --out, or --plan, or --render-k8s")
    from ftpipe.standalone import train_folder, train_processes

    from services.trainer import distributed

    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: the number of processes is at least 1")
    if args.nproc > 1:
        result = train_processes(args.recipe, args.data, args.out, args.nproc)
    else:
        result = train_folder(args.recipe, args.data, args.out, console=err)
        if distributed.rank() != 0:  # one of torchrun's processes: rank 0 reports
            return 0
    _print_json(result) if args.json else out.print(f"adapter → {result['adapter_dir']}\n  " +
                                                   ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
    return 0


def _plan(args) -> int:
    """Print the memory plan of the recipe on its hardware (shared/domain/memory_plan.py); exit 1
    when it does not fit."""
    from shared.domain.memory_plan import PlanError, plan_recipe
    from shared.domain.recipe import load_recipe

    try:
        plan = plan_recipe(load_recipe(args.recipe))
    except PlanError as exc:
        raise UsageError(f"no memory plan: {exc}") from None
    _print_json(plan.to_dict()) if args.json else out.print(escape(plan.describe()))
    return 0 if plan.fits else 1


def _render_k8s(args) -> int:
    """Print the Kubernetes Job / JobSet that trains a run of this recipe on GKE (services/trainer/k8s.py)."""
    import yaml

    from shared.domain.recipe import load_recipe
    from shared.platform.build_info import ftpipe_version

    from services.trainer.k8s import RenderError, render

    settings = _settings(args)
    try:
        manifest = render(load_recipe(args.recipe), args.run_id,
                          args.dataset_uri or f"gs://{settings.bucket}/datasets/DATASET_ID/", tenant=args.tenant,
                          image=args.image or os.environ.get("FTPIPE_TRAINER_IMAGE")
                          or f"ftpipe/trainer:{ftpipe_version()}",
                          namespace=args.namespace,
                          env={"FTPIPE_BUCKET": settings.bucket, "FTPIPE_PROJECT": settings.project})
    except RenderError as exc:
        raise UsageError(str(exc)) from None
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def cmd_evaluate(args) -> int:
    if args.estimate:
        return _estimate_evaluation(args)
    if not (args.data and args.adapter):
        raise UsageError("ftpipe evaluate needs --data (a prepared dataset folder) and --adapter, or --estimate")
    from ftpipe.standalone import evaluate_adapter

    result = evaluate_adapter(args.recipe, args.data, args.adapter, probes=args.probes, production=args.production)
    if args.json:
        _print_json(result)
    else:
        out.print(result["report_markdown"])
    return 0 if result["passed"] else 1


def _estimate_evaluation(args) -> int:
    """Print what evaluating --examples test examples would cost on the recipe's GPU (services/evaluator/cost.py)."""
    from shared.domain.recipe import load_recipe

    from services.evaluator.cost import describe, estimate_evaluation_cost
    from services.preprocess.cost import count_parameters

    recipe = load_recipe(args.recipe)
    params = count_parameters(recipe.base_model)
    if params is None:
        raise UsageError(f"cannot count the parameters of base_model {recipe.base_model!r} (no local weights or "
                         "config.json): use a built-in model or a model folder")
    estimate = estimate_evaluation_cost(recipe, examples=args.examples or recipe.eval.max_examples, params=params,
                                        tokens_per_s=args.tokens_per_s)
    _print_json(estimate.to_dict()) if args.json else out.print(escape(describe(estimate)))
    return 0


def cmd_serve(args) -> int:
    """The OpenAI-compatible API over one base model and the registry's adapters (services/serving/)."""
    from shared.platform.auth import local_token
    from shared.platform.logs import configure_logging

    from services.serving.routing import ServingError
    from services.serving.server import ServingConfig, serve, splits_from

    settings = _settings(args)
    if args.max_adapters is not None and args.max_adapters < 1:
        raise UsageError(f"--max-adapters {args.max_adapters}: at least 1 adapter must fit in memory")
    try:
        splits = splits_from(args.split or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = ServingConfig.from_env(settings, base=args.base, max_adapters=args.max_adapters, host=args.host,
                                    port=args.port, max_tokens_limit=args.max_tokens_limit, splits=splits or None)
    configure_logging(settings.log_format, settings.log_level)

    def ready(server) -> None:
        token = "" if settings.in_cloud else f" (bearer token: {settings.state_dir / 'auth-token'})"
        err.print(escape(f"serving {config.base} and its registered adapters (up to {config.max_adapters} in memory) "
                         f"at {server.url}/v1{token}; metrics at {server.url}/metrics; Ctrl-C stops"))

    if not settings.in_cloud:
        local_token(settings.state_dir)   # created now, so it can be read before the first request
    try:
        serve(settings, config, ready=ready)
    except ServingError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_demo(args) -> int:
    from ftpipe.demo import run_demo

    return run_demo(_settings(args), keep_up=args.keep_up, console=err)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", help="state folder (default: $FTPIPE_STATE or ./.ftpipe)")
    common.add_argument("--profile", choices=["local", "emulators", "gcp"], help="adapters to use (default: $FTPIPE_PROFILE or local)")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="act as this token (default: $FTPIPE_TOKEN, else the stack's own, its admin)")
    parser = argparse.ArgumentParser(prog="ftpipe", description="Event-driven fine-tuning pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    add("up", cmd_up, "start the local stack (each service its own process)")
    add("down", cmd_down, "stop the local stack")
    p = add("dashboard", cmd_dashboard, "print the local dashboard's link (it carries the stack's access token)")
    p.add_argument("--open", action="store_true", help="open it in a web browser as well")
    for name, fn, help_ in (("drop", cmd_drop, "drop a dataset file into incoming/<tenant>/<recipe>/ to start a run"),
                            ("submit", cmd_submit, "submit a job file (recipe, dataset, overrides)")):
        p = add(name, fn, help_)
        if name == "drop":
            p.add_argument("file")
            p.add_argument("--recipe", required=True, help="recipe name (see recipes/) or a recipe YAML file")
            p.add_argument("--dry-run", action="store_true",
                           help="prepare in-process and print counts, token counts and the cost estimate; upload nothing")
            p.add_argument("--legal-basis", help="legal basis / consent reference, recorded in the manifest")
            p.add_argument("--tenant", help="the tenant it is for (default: your only one); it lands in incoming/<tenant>/")
        else:
            p.add_argument("job", help="YAML: recipe, dataset, [prepared, overrides, tenant]")
        p.add_argument("--wait", action="store_true", help="wait for the run to end, showing progress")
        p.add_argument("--json", action="store_true", help="with --wait: print the run record as JSON")
        p.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    p = add("status", cmd_status, "show a run")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p = add("watch", cmd_watch, "follow a run until it ends")
    p.add_argument("run")
    p.add_argument("--timeout", type=float, default=3600)
    p = add("cancel", cmd_cancel, "cancel a run")
    p.add_argument("run")
    p = add("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p = add("models", cmd_models, "the model registry: list, show, approve, promote, roll back, archive, "
                                  "re-evaluate, seal, export")
    p.add_argument("--json", action="store_true")
    models = p.add_subparsers(dest="action", metavar="ACTION")
    # SUPPRESS: an option given before the action is not reset by the action's own default.
    nested = argparse.ArgumentParser(add_help=False)
    nested.add_argument("--state", default=argparse.SUPPRESS, help="state folder")
    nested.add_argument("--profile", choices=["local", "emulators", "gcp"], default=argparse.SUPPRESS)
    nested.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    nested.add_argument("--token", default=argparse.SUPPRESS, help="act as this token")

    def model_action(name, help_, *, version=True):
        q = models.add_parser(name, parents=[nested], help=help_, description=help_)
        q.add_argument("name", help="the model name (a recipe's model_name)")
        if version:
            q.add_argument("version", help="MAJOR.MINOR, e.g. 1.2")
        return q

    q = models.add_parser("list", parents=[nested], help="registered versions, newest first (the default)",
                          description="registered versions, newest first (the default)")
    q.add_argument("name", nargs="?", help="only this model's versions")
    q = model_action("show", "a model's versions, aliases and their history; with VERSION, its model card",
                     version=False)
    q.add_argument("version", nargs="?")
    q = model_action("approve", "approve a candidate (recipe registry.approval): it goes to production")
    q.add_argument("--note", help="a note kept with the approval")
    q = model_action("promote", "point an alias (default production) at a version")
    q.add_argument("--alias", choices=["production", "staging"], default="production")
    q = model_action("rollback", "point an alias back at its previous version, or at --to VERSION", version=False)
    q.add_argument("--to", metavar="VERSION", help="the version to roll back to")
    q.add_argument("--alias", choices=["production", "staging"], default="production")
    q = model_action("reevaluate", "evaluate again a version whose evaluation errored (unevaluated) or whose "
                                   "evidence was inconclusive (held)")
    for name, help_ in (("archive", "retire a version (it can come back by rollback or promote)"),
                        ("quarantine", "bar a version for good: never promoted or served")):
        q = model_action(name, help_)
        q.add_argument("--reason", required=True, help="why")
    q = model_action("policy", "show or change (admin) the model name's policy: owners, approval, four eyes, "
                               "privacy review, LLM judge, locked suites, gate floors", version=False)
    q.add_argument("--owner", action="append", metavar="TENANT", help="a tenant that owns the name (repeat)")
    for flag, field, help_ in (("approval", "approval_required", "versions need approval"),
                               ("four-eyes", "four_eyes", "a run's submitter may not approve its version"),
                               ("privacy-review", "privacy_review", "its data needs a privacy sign-off"),
                               ("llm-judge", "llm_judge", "a job may send probe answers to an LLM judge (eval.judge)")):
        q.add_argument(f"--{flag}", dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_)
    q.add_argument("--lock", metavar="SUITES", help="comma-separated suites a job may not disable "
                                                    "(safety,memorisation,fairness; '' for none)")
    q.add_argument("--gate", action="append", metavar="METRIC=RULE",
                   help='a floor rule as JSON, e.g. chrf=\'{"tolerance": 0.02, "relative": true}\' (repeat)')
    q = model_action("seal", "admin: record the digests of a version registered before the registry kept them, "
                     "from its bucket copy as it is now (check that copy first); serving and export refuse it until then")
    q = model_action("export", "merged safetensors weights and the adapter in the layout vLLM loads")
    q.add_argument("--out", required=True, help="a new folder: merged/, adapter/, export.json")
    q.add_argument("--no-merged", action="store_true", help="only the adapter")
    q.add_argument("--no-adapter", action="store_true", help="only the merged weights")
    p = add("dlq", cmd_dlq, "list or replay dead-lettered messages")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("--topic")
    p.add_argument("--message-id", help="replay only this message")
    p.add_argument("--json", action="store_true")
    p = add("tenants", cmd_tenants, "per-tenant quotas: list, show one with its usage, or set its limits; "
            "reindex: recount the per-tenant totals of GET /api/tenants from the runs")
    p.add_argument("action", choices=["list", "show", "set", "reindex"])
    p.add_argument("tenant", nargs="?")
    p.add_argument("--max-concurrent", metavar="N", help="set: runs training at once (a number, or 'unlimited')")
    p.add_argument("--gpu-hours-per-month", metavar="H",
                   help="set: GPU-hours per calendar month, UTC (a number, or 'unlimited')")
    p.add_argument("--cost-per-month", metavar="USD",
                   help="set: USD per calendar month, UTC, at the recipes' GPU prices (a number, or 'unlimited')")
    p.add_argument("--unlimited", action="store_true",
                   help="set: lift every limit; the tenant is listed, explicitly unlimited")
    p.add_argument("--json", action="store_true")
    p = add("tokens", cmd_tokens, "named local tokens (admin): create one with a role, list, revoke")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("name", nargs="?")
    p.add_argument("--role", choices=["viewer", "submitter", "approver", "admin"])
    p.add_argument("--tenant", help="the tenant the role is held in (every role but admin)")
    p.add_argument("--json", action="store_true")
    p = add("roles", cmd_roles, "who holds which role (admin): grant, revoke, list")
    p.add_argument("action", choices=["grant", "revoke", "list"])
    p.add_argument("subject", nargs="?", help="an email, a service account's email, or token:NAME")
    p.add_argument("--role", choices=["viewer", "submitter", "approver", "admin"])
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p = add("recipes", cmd_recipes, "list, show or validate recipes (built-in names or YAML files)")
    p.add_argument("action", choices=["list", "show", "validate"])
    p.add_argument("recipes", nargs="*", help="show: one recipe; validate: one or more")
    p.add_argument("--json", action="store_true")
    p = add("prepare", cmd_prepare, "run the preprocess stage alone, in-process")
    p.add_argument("file")
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p = add("privacy", cmd_privacy, "privacy sign-off: list datasets awaiting review, approve or reject one")
    p.add_argument("action", choices=["list", "approve", "reject"])
    p.add_argument("run", nargs="?")
    p.add_argument("--note", help="approve: a note kept with the sign-off")
    p.add_argument("--reason", help="reject: why")
    p.add_argument("--json", action="store_true")
    p = add("train", cmd_train, "run the training stage alone, in-process (or print its GKE Job: --render-k8s)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--data", help="a prepared dataset folder (train/val/test.jsonl)")
    p.add_argument("--out", help="where the checkpoints and the adapter go")
    p.add_argument("--nproc", type=int, default=1,
                   help="train in N processes on this machine (torchrun) with the recipe's distribution.strategy")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan on the recipe's hardware (peak per GPU, micro-batch that fits); "
                        "exit 1 when nothing fits")
    p.add_argument("--render-k8s", action="store_true",
                   help="print the Kubernetes Job (one node) or JobSet (several) that trains a run of the recipe on GKE")
    p.add_argument("--run-id", default="preview", help="--render-k8s: the run (default: preview)")
    p.add_argument("--dataset-uri", help="--render-k8s: the prepared dataset (default: gs://BUCKET/datasets/DATASET_ID/)")
    p.add_argument("--tenant", default="default", help="--render-k8s: the tenant the run is billed to")
    p.add_argument("--image", help="--render-k8s: the trainer image (default: $FTPIPE_TRAINER_IMAGE or ftpipe/trainer:VERSION)")
    p.add_argument("--namespace", default="ftpipe", help="--render-k8s: the namespace (default: ftpipe)")
    p = add("evaluate", cmd_evaluate,
            "run the evaluation stage alone, in-process (or estimate its cost on the recipe's GPU: --estimate)")
    p.add_argument("--recipe", required=True)
    p.add_argument("--data", help="a prepared dataset folder (test.jsonl)")
    p.add_argument("--adapter", help="the trained adapter folder (or, for adapter.kind full, the model folder)")
    p.add_argument("--production", help="the production version's adapter folder, scored as a third side")
    p.add_argument("--probes", help="knowledge probes JSONL (question, expect)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--estimate", action="store_true",
                   help="print the time and cost of evaluating on one GPU of the recipe's hardware; run nothing")
    p.add_argument("--examples", type=int, help="--estimate: test examples scored (default: the recipe's eval.max_examples)")
    p.add_argument("--tokens-per-s", type=float, help="--estimate: a measured generation throughput to use")
    p = add("serve", cmd_serve, "an OpenAI-compatible API over a base model and every registered LoRA adapter on it")
    p.add_argument("--base", help="the base model reference (default: $FTPIPE_SERVING_BASE or smollm2-135m-instruct)")
    p.add_argument("--max-adapters", type=int, help="adapters kept in memory, least recently used out first (default 4)")
    p.add_argument("--split", action="append", metavar="NAME=ARM:W,ARM:W",
                   help="an A/B split of NAME's traffic by weight, sticky per user (arms: versions or aliases), "
                        "e.g. support-bot=production:90,staging:10; repeat for other models")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: a free one; advertised in <state>/services/serving.json)")
    p.add_argument("--max-tokens-limit", type=int, help="the largest max_tokens a request may ask for (default 2048)")
    p = add("demo", cmd_demo, "the end-to-end demo on the embedded defaults")
    p.add_argument("--keep-up", action="store_true", help="leave the stack running afterwards")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from shared.platform.logs import configure_logging

    configure_logging("text", os.environ.get("FTPIPE_LOG_LEVEL", "WARNING"))
    args = build_parser().parse_args(argv)
    from ftpipe.client import ClientError
    from ftpipe.stack import StackError
    from ftpipe.standalone import StageInputError
    from shared.domain.model_export import ExportError
    from shared.domain.model_policy import PolicyError
    from shared.domain.model_registry import RegistryError
    from shared.domain.models import ModelNotAvailable
    from shared.domain.recipe import RecipeError
    from shared.domain.tenants import TenantError
    from shared.platform.push import AuthError

    try:
        return args.fn(args)
    except (UsageError, ClientError, StackError, StageInputError, RecipeError, ModelNotAvailable, TimeoutError,
            TenantError, RegistryError, ExportError, PolicyError, LookupError) as exc:
        # Messages carry file names and lists ("[...]"): not rich markup. Not wrapped either, so that
        # a message stays one line for whoever greps a log.
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2
    except AuthError as exc:   # a role the caller does not hold (shared/domain/access.py)
        err.print(f"[red]refused:[/red] {escape(exc.reason)}", soft_wrap=True)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
