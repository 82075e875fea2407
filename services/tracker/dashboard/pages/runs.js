// #/runs?status=&recipe=&tenant= — every run with where it is, refreshed while the page is open.

import { api, qs } from "../api.js";
import { badge, dash, fillRows, fmtDuration, fmtTime, fmtUsd, h, link, progressBar, table } from "../dom.js";

const STATUSES = ["validating", "queued", "running", "succeeded", "failed", "cancelled"];

/** "so far / estimate" from the run's cost, or the dataset's estimate before training starts. */
export function costText(run) {
  const cost = run.cost || {};
  const estimate = cost.estimate_usd ?? run.cost_estimate?.cost;
  if (cost.so_far_usd === undefined && estimate === undefined) return dash;
  if (cost.so_far_usd === undefined) return `est. ${fmtUsd(estimate)}`;
  return estimate === undefined ? fmtUsd(cost.so_far_usd) : `${fmtUsd(cost.so_far_usd)} / ${fmtUsd(estimate)}`;
}

export function progressOf(run) {
  const t = run.training || {};
  if (t.progress === undefined) return dash;
  return progressBar(t.progress, t.total_steps ? `${t.step ?? 0} / ${t.total_steps}` : undefined);
}

export default async function runsPage(view, ctx) {
  const filters = { status: ctx.query.get("status") || "", recipe: ctx.query.get("recipe") || "",
                    tenant: ctx.query.get("tenant") || "" };
  const selected = new Set();
  const compare = h("button", { testid: "compare-selected", disabled: true, onclick: () => {
    location.hash = `#/compare?runs=${[...selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  const updated = h("span", { class: "muted", testid: "refreshed" });

  const columns = [
    ["", (r) => h("input", { type: "checkbox", checked: selected.has(r.run_id), "aria-label": `select ${r.run_id}`,
                             onchange: (e) => toggle(r.run_id, e.target.checked) })],
    ["run", (r) => link(["runs", r.run_id], r.run_id, { testid: "run-link" })],
    ["status", (r) => badge(r.status)],
    ["where", (r) => r.sub_state ?? dash],
    ["recipe", (r) => (r.recipe ? `${r.recipe.name} v${r.recipe.version}` : dash)],
    ["tenant", (r) => r.tenant ?? dash],
    ["progress", progressOf],
    ["ETA", (r) => (r.status === "running" ? fmtDuration(r.training?.eta_s) : dash)],
    ["cost", costText],
    ["model", (r) => (r.model ? link(["models", r.model.name], `${r.model.name} ${r.model.version}`) : dash)],
    ["created", (r) => fmtTime(r.created_at)],
  ];
  const runs = table(columns, [], { testid: "runs-table" });
  const body = runs.querySelector("tbody");

  function toggle(runId, on) {
    if (on) selected.add(runId);
    else selected.delete(runId);
    compare.disabled = selected.size < 2;
  }

  async function refresh() {
    const rows = await api(`runs${qs({ ...filters, order_by: "-created_at", limit: 200 })}`);
    fillRows(body, columns, rows, (r) => ({ testid: "run-row", data: { runId: r.run_id, status: r.status } }),
      "no runs match: drop a file into incoming/<recipe>/ or start one from “New run”");
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  function filterInput(name, control) {
    control.addEventListener("change", () => {
      filters[name] = control.value.trim();
      ctx.setQuery(filters);
      refresh();
    });
    return h("label", null, name, control);
  }

  await refresh(); // first, so that a refused request (no token) leaves no empty table behind
  view.append(
    h("div", { class: "toolbar" },
      h("h1", null, "Runs"),
      filterInput("status", h("select", { testid: "filter-status" },
        h("option", { value: "" }, "any"),
        STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)))),
      filterInput("recipe", h("input", { type: "search", testid: "filter-recipe", value: filters.recipe,
                                         placeholder: "recipe name" })),
      filterInput("tenant", h("input", { type: "search", testid: "filter-tenant", value: filters.tenant,
                                         placeholder: "tenant" })),
      compare, updated),
    runs);
  ctx.every(refresh, 3000, (err) => { updated.textContent = `refresh failed: ${err.message}`; });
}
