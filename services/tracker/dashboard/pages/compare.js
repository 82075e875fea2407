// #/compare?runs=a,b[,c] — the runs' curves overlaid, their hyperparameters and scores side by
// side with the differing rows marked.

import { api, qs } from "../api.js";
import { alignByStep, stepChart } from "../charts.js";
import { dash, fmtNum, h, link, section, table } from "../dom.js";

const OVERLAYS = [["Loss", "loss"], ["Validation loss", "val_loss"], ["Learning rate", "lr"], ["Gradient norm", "grad_norm"]];

const same = (values) => new Set(values.map((v) => JSON.stringify(v ?? null))).size <= 1;

/** Rows of key → one value per run; rows whose values differ are marked (`data-differs`). */
function sideBySide(runs, keys, valueOf, { testid, differing }) {
  return table([
    ["", (key) => key],
    ...runs.map((r) => [r.run_id, (key) => {
      const v = valueOf(r, key);
      return v === undefined ? dash : typeof v === "number" ? fmtNum(v) : JSON.stringify(v);
    }]),
  ], keys, {
    testid,
    rowProps: (key) => {
      const differs = differing ? differing.has(key) : !same(runs.map((r) => valueOf(r, key)));
      return { testid: `${testid}-row`, class: differs ? "differs" : null, data: { key, differs } };
    },
  });
}

export default async function comparePage(view, ctx) {
  const ids = (ctx.query.get("runs") || "").split(",").map((s) => s.trim()).filter(Boolean);
  const input = h("input", { type: "text", value: ids.join(","), testid: "compare-runs", size: 60,
                             placeholder: "run ids, comma separated" });
  const form = h("form", { class: "toolbar", onsubmit: (e) => {
    e.preventDefault();
    location.hash = `#/compare?runs=${input.value.split(",").map((s) => encodeURIComponent(s.trim())).filter(Boolean).join(",")}`;
  } }, h("h1", null, "Compare runs"), input, h("button", { type: "submit" }, "Compare"));
  view.append(form);
  if (ids.length < 2) {
    view.append(h("p", { class: "muted" }, "Name two or more runs (or tick them on the Runs page)."));
    return;
  }
  const data = await api(`compare${qs({ runs: ids.join(",") })}`);
  const runs = data.runs;
  const metrics = runs.map((r) => data.metrics?.[r.run_id] || []);

  const charts = h("section", { class: "charts", testid: "charts" });
  view.append(
    h("p", null, runs.map((r, i) => [i ? " · " : "", link(["runs", r.run_id], r.run_id),
      r.recipe ? h("span", { class: "muted" }, ` (${r.recipe.name} v${r.recipe.version})`) : null])),
    charts);
  for (const [title, key] of OVERLAYS) {
    const columns = alignByStep(metrics, key);
    if (!columns.slice(1).some((c) => c.some((v) => v !== null))) continue; // no run logged it
    const chart = stepChart(title, runs.map((r) => r.run_id), { testid: `compare-${key}` });
    charts.append(chart.el);
    chart.set(columns);
  }

  const hyper = [...new Set(runs.flatMap((r) => Object.keys(r.hyperparameters || {})))].sort();
  const differing = new Set(data.differing || []);
  const hyperTable = sideBySide(runs, hyper, (r, k) => r.hyperparameters?.[k], { testid: "hyperparameters", differing });
  // A resolved recipe has a hundred settings: show the ones that differ, the rest on request.
  hyperTable.classList.toggle("only-differing", differing.size > 0);
  const onlyDiffering = h("input", { type: "checkbox", testid: "only-differing", checked: differing.size > 0,
                                     onchange: (e) => hyperTable.classList.toggle("only-differing", e.target.checked) });
  // Final training metrics and the candidate's evaluation scores, one row each.
  const scoreKeys = [...new Set(runs.flatMap((r) => [
    ...Object.keys(r.final_metrics || {}).map((k) => `final_metrics.${k}`),
    ...Object.keys(r.scores?.candidate || {}).map((k) => `scores.candidate.${k}`),
  ]))].sort();
  const scoreOf = (r, key) => {
    const [group, ...rest] = key.split(".");
    return group === "final_metrics" ? r.final_metrics?.[rest.join(".")] : r.scores?.candidate?.[rest.slice(1).join(".")];
  };
  view.append(
    section("Scores", sideBySide(runs, scoreKeys, scoreOf, { testid: "scores-diff" })),
    section("Hyperparameters", differing.size
      ? [h("label", null, onlyDiffering, ` only the ${differing.size} of ${hyper.length} that differ`), hyperTable]
      : h("details", null, h("summary", null, `all ${hyper.length} are the same`), hyperTable)),
  );
}
