"""Views over the lineage documents that the read API serves: pure functions of documents, so tests
call them without a store. Per-tenant aggregates, the dataset funnel, run comparisons, the lineage
graph of a model version, and the recipes' form for the no-code path."""
from __future__ import annotations

from typing import Any, Iterable

from shared.domain import tenant_stats
from shared.domain.recipe import Recipe

# The hyperparameters the dashboard's no-code form offers (POST /api/runs `overrides`).
EDITABLE = ("training.epochs", "training.max_steps", "training.learning_rate", "training.lr_scheduler",
            "training.warmup_steps", "training.batch_size", "training.max_seq_len", "adapter.r", "adapter.alpha",
            "adapter.dropout")
SPLITS = ("train", "val", "test")


def public_run(doc: dict) -> dict:
    """A run document as the API answers it: checkpoints and alerts as lists ordered by step (the
    document keeps maps keyed by step, so that redelivered events overwrite rather than append), and
    without the copy of the review request the privacy sign-off republishes."""
    out = dict(doc)
    out["checkpoints"] = [{"step": int(step), **c} for step, c in
                          sorted((doc.get("checkpoints") or {}).items(), key=lambda kv: int(kv[0]))]
    out["alerts"] = sorted((doc.get("alerts") or {}).values(), key=lambda a: (a["step"], a["kind"]))
    if isinstance(out.get("privacy_review"), dict):
        out["privacy_review"] = {k: v for k, v in out["privacy_review"].items() if k != "event"}
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"training": {"learning_rate": 1e-3}} -> {"training.learning_rate": 1e-3}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def hyperparameters(recipe: dict | None) -> dict[str, Any]:
    """A run's resolved recipe, flattened; name, version and description say nothing of training."""
    if not recipe:
        return {}
    return flatten({k: v for k, v in recipe.items() if k not in ("name", "version", "description")})


def compare(runs: list[dict], recipes: dict[str, dict | None], metrics: dict[str, list[dict]]) -> dict:
    """Runs side by side: their hyperparameters, final metrics and scores, and the hyperparameters
    whose values differ between them (a key one run lacks differs too)."""
    rows = [{"run_id": r["run_id"], "status": r.get("status"), "recipe": r.get("recipe"),
             "hyperparameters": hyperparameters(recipes.get(r["run_id"])), "final_metrics": r.get("final_metrics", {}),
             "scores": (r.get("evaluation") or {}).get("scores", {})} for r in runs]
    keys = sorted(set().union(*(row["hyperparameters"] for row in rows))) if rows else []
    missing = object()
    differing = [k for k in keys if len({repr(row["hyperparameters"].get(k, missing)) for row in rows}) > 1]
    return {"runs": rows, "metrics": metrics, "differing": differing}


def funnel(counts: dict[str, int]) -> list[dict]:
    """Rows left after each preprocess stage (services/preprocess/job.py's counts): raw, valid
    (schema), dedup (exact and near), quality (heuristic filters), pii (masking keeps every row;
    `masked` of them had PII) and split (train / val / test). Stages a dataset lacks are left out."""
    stages = []
    if "raw" in counts:
        stages.append({"stage": "raw", "rows": counts["raw"]})
    if "valid" in counts:
        stages.append({"stage": "valid", "rows": counts["valid"], "removed": counts.get("rejected", 0)})
    if "deduplicated" in counts:
        stages.append({"stage": "dedup", "rows": counts["deduplicated"],
                       "removed": counts.get("duplicates_removed", 0) + counts.get("near_duplicates_removed", 0)})
        kept = counts["deduplicated"] - counts.get("quality_filtered", 0)
        stages.append({"stage": "quality", "rows": kept, "removed": counts.get("quality_filtered", 0)})
        stages.append({"stage": "pii", "rows": kept, "masked": counts.get("pii_masked_rows", 0)})
    if any(s in counts for s in SPLITS):
        stages.append({"stage": "split", "rows": sum(counts.get(s, 0) for s in SPLITS),
                       **{s: counts.get(s, 0) for s in SPLITS}})
    return stages


def dataset_view(doc: dict, manifest: dict | None = None) -> dict:
    """A dataset document as the API answers it; `manifest` (its manifest.json) fills in the PII
    figures of a dataset that was not held for review (only review requests carry them)."""
    pii = doc.get("pii") or (manifest or {}).get("pii") or {}
    out = {**doc, "funnel": funnel(doc.get("counts") or {}),
           "pii": {"counts": pii.get("counts", {}), "residual_rate": pii.get("residual_rate"),
                   **{k: pii[k] for k in ("rows_masked", "rows_scanned", "residual_threshold", "backend") if k in pii}},
           "tokens": doc.get("tokens"), "cost_estimate": doc.get("cost_estimate"),
           "privacy_review": doc.get("privacy_review")}
    if manifest:
        out["source"] = manifest.get("source")
    return out


def tenants(runs: Iterable[dict]) -> list[dict]:
    """Per tenant: jobs by status, success rate (succeeded / (succeeded + failed); cancelled runs
    count neither way; None before any ended), GPU-hours and USD spent training (the trainer's
    figures, folded into each run's `cost`). A recount over the runs; the API reads the same
    figures kept up to date in tenant_stats (`tenant_rows`)."""
    return tenant_rows({"tenant": tenant, **counts} for tenant, counts in tenant_stats.totals(runs).items())


def tenant_rows(stats: Iterable[dict]) -> list[dict]:
    """`tenants`' answer from tenant_stats documents (shared/domain/tenant_stats.py), by tenant name."""
    out = []
    for doc in sorted(stats, key=lambda d: d["tenant"]):
        if doc.get("jobs", 0) <= 0:
            continue
        row = {k: int(doc.get(k, 0)) for k in ("jobs", "succeeded", "failed", "cancelled", "running", "queued")}
        ended = row["succeeded"] + row["failed"]
        out.append({"tenant": doc["tenant"], **row, "gpu_hours": round(doc.get("gpu_hours_e6", 0) / 1e6, 4),
                    "cost_usd": round(doc.get("cost_usd_e6", 0) / 1e6, 4),
                    "success_rate": round(row["succeeded"] / ended, 4) if ended else None})
    return out


def lineage_graph(version: dict, run: dict | None, dataset: dict | None) -> dict:
    """The chain from a model version back to the file that started it: model -> run -> dataset ->
    drop (an object dropped into incoming/, or a file submitted). Links that are not known (yet)
    end the chain."""
    name, number = version["name"], version["version"]
    nodes = [{"kind": "model", "id": f"model:{name}@{number}", "label": f"{name} {number}", "uri": version.get("uri"),
              "details": {k: version.get(k) for k in ("status", "aliases", "base_model", "registered_at")
                          if version.get(k) is not None}}]
    edges = []

    def link(node: dict) -> None:
        edges.append({"from": nodes[-1]["id"], "to": node["id"]})
        nodes.append(node)

    if run is None:
        return {"nodes": nodes, "edges": edges}
    recipe = run.get("recipe") or {}
    link({"kind": "run", "id": f"run:{run['run_id']}", "label": run["run_id"], "uri": run.get("adapter_uri"),
          "details": {"status": run.get("status"), "recipe": recipe, "tenant": run.get("tenant"),
                      "final_metrics": run.get("final_metrics"), "created_at": run.get("created_at")}})
    data = dataset or run.get("dataset") or {}
    if data.get("id"):
        link({"kind": "dataset", "id": f"dataset:{data['id']}", "label": data["id"], "uri": data.get("uri"),
              "details": {"counts": data.get("counts"), "privacy_review": (data.get("privacy_review") or {}).get("status")}})
    source = run.get("source") or {}
    if run.get("input_uri"):
        dropped = "object" in source
        link({"kind": "drop", "id": f"drop:{run['input_uri']}",
              "label": source["object"] if dropped else str(source.get("submitted", run["input_uri"])).rsplit("/", 1)[-1],
              "uri": run["input_uri"],
              "details": {"via": "drop" if dropped else "submit", "recipe": recipe.get("name"),
                          **{k: source[k] for k in ("bucket", "object", "generation", "size", "uploaded_at",
                                                    "legal_basis", "submitted", "by") if k in source}}})
    return {"nodes": nodes, "edges": edges}


def recipe_form(recipe: Recipe) -> dict:
    """What the no-code form shows of a recipe, with the editable hyperparameters' defaults."""
    flat = flatten(recipe.model_dump(mode="json"))
    return {"name": recipe.name, "version": recipe.version, "description": recipe.description, "task": recipe.task,
            "method": recipe.method, "adapter": recipe.adapter.kind, "base_model": recipe.base_model,
            "model_name": recipe.model_name, "privacy_review": recipe.data.privacy_review, "hash": recipe.hash,
            "hyperparameters": {key: flat[key] for key in EDITABLE}}
