// #/datasets and #/datasets/<id> — what preparation kept at each stage, the PII figures, and what
// training on it costs.

import { api, qs } from "../api.js";
import { badge, dash, facts, fmtNum, fmtPct, fmtUsd, h, link, section, table } from "../dom.js";

export async function datasetsPage(view) {
  const datasets = await api(`datasets${qs({ limit: 200 })}`);
  const rows = (d, stage) => d.funnel?.find((f) => f.stage === stage)?.rows;
  view.append(h("h1", null, "Datasets"), table([
    ["dataset", (d) => link(["datasets", d.id], d.id, { testid: "dataset-link" })],
    ["raw rows", (d) => fmtNum(rows(d, "raw") ?? d.counts?.raw)],
    ["tokens", (d) => fmtNum(d.tokens?.total)],
    ["cost estimate", (d) => fmtUsd(d.cost_estimate?.cost)],
    ["runs", (d) => (d.runs || []).length],
  ], datasets, { testid: "datasets-table", rowProps: (d) => ({ testid: "dataset-row", data: { datasetId: d.id } }),
                 empty: "no prepared datasets yet" }));
}

/** What a stage's entry says besides its rows: removed, masked, or the split's parts. */
function stageNote(stage) {
  const notes = [];
  if (stage.removed) notes.push(`${fmtNum(stage.removed)} removed`);
  if (stage.masked) notes.push(`${fmtNum(stage.masked)} masked`);
  for (const split of ["train", "val", "test"]) if (stage[split] !== undefined) notes.push(`${split} ${fmtNum(stage[split])}`);
  return notes.length ? h("span", { class: "muted" }, ` (${notes.join(", ")})`) : null;
}

/** Horizontal bars, each as long as its stage's share of the raw rows. */
function funnel(stages) {
  const max = Math.max(1, ...stages.map((s) => s.rows ?? 0));
  return h("div", { class: "funnel", testid: "funnel" }, stages.map((stage) => {
    const bar = h("span", { class: "funnel-bar" });
    bar.style.width = `${((stage.rows ?? 0) / max) * 100}%`; // CSSOM: allowed by the page's CSP
    return h("div", { class: "funnel-stage", testid: "funnel-stage", data: { stage: stage.stage, rows: stage.rows ?? "" } },
      h("span", { class: "funnel-name" }, stage.stage),
      h("span", { class: "funnel-track" }, bar),
      h("span", { class: "funnel-rows" }, fmtNum(stage.rows), stageNote(stage)));
  }));
}

export function piiFacts(pii) {
  return h("div", null,
    facts([
      ["residual rate", h("span", { testid: "pii-residual" }, fmtPct(pii.residual_rate, 2))],
      ["threshold", pii.residual_threshold !== undefined ? fmtPct(pii.residual_threshold, 2) : undefined],
      ["rows masked", pii.rows_masked !== undefined ? fmtNum(pii.rows_masked) : undefined],
    ]),
    table([["category", ([k]) => k], ["masked", ([, v]) => fmtNum(v)]], Object.entries(pii.counts || {}),
      { testid: "pii-counts", empty: "no PII found" }));
}

export async function datasetPage(view, ctx) {
  const [id] = ctx.params;
  const d = await api(`datasets/${encodeURIComponent(id)}`);
  const tokens = d.tokens || {};
  const cost = d.cost_estimate || {};
  const review = d.privacy_review;
  view.append(
    h("h1", null, "Dataset ", h("span", { testid: "dataset-id" }, d.id)),
    facts([
      ["uri", h("code", null, d.uri ?? dash)],
      ["privacy review", review ? badge(review.status ?? "unknown", "privacy-status") : "not required"],
    ]),
    h("div", { class: "grid-2" },
      section("Stages", funnel(d.funnel || [])),
      section("PII", piiFacts(d.pii || {})),
      section("Tokens", facts([
        ["total", h("span", { testid: "tokens-total" }, fmtNum(tokens.total))],
        ...["train", "val", "test"].filter((s) => tokens[s]).map((s) => [s, fmtNum(tokens[s].tokens)]),
        ["max sequence length", tokens.max_seq_len !== undefined ? fmtNum(tokens.max_seq_len) : undefined],
        ["tokenizer", tokens.tokenizer],
      ])),
      section("Cost estimate", facts([
        ["cost", h("span", { testid: "cost-estimate" }, fmtUsd(cost.cost))],
        ["GPU hours", fmtNum(cost.gpu_hours)],
        ["trained tokens", fmtNum(cost.trained_tokens)],
        ["hardware", cost.hardware ? `${cost.hardware.count} × ${cost.hardware.gpu}` : undefined],
        ["limited by", cost.limited_by],
      ])),
    ),
    section("Runs on this dataset", h("ul", { testid: "dataset-runs" },
      (d.runs || []).map((r) => h("li", null, link(["runs", r], r))))),
  );
}
