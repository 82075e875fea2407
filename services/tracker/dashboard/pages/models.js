// #/models and #/models/<name> — versions, where the aliases point, each version's evaluation, and
// the registry's actions, offered where the caller's role allows them (`caller_may`). The server decides
// again; a refusal (403, 409) shows its message.

import { api } from "../api.js";
import { action, badge, dash, fill, fmtDelta, fmtNum, fmtTime, h, link, section, table } from "../dom.js";

const aliasList = (aliases) => Object.entries(aliases || {}).map(([alias, version]) => `${alias} → ${version}`).join(", ");

export async function modelsPage(view) {
  const models = await api("models");
  view.append(h("h1", null, "Models"), table([
    ["model", (m) => link(["models", m.name], m.name, { testid: "model-link" })],
    ["aliases", (m) => aliasList(m.aliases) || dash],
    ["versions", (m) => (Array.isArray(m.versions) ? m.versions.length : m.versions ?? dash)],
    ["latest", (m) => (typeof m.latest === "object" && m.latest ? m.latest.version : m.latest) ?? dash],
  ], models, { testid: "models-table", rowProps: (m) => ({ testid: "model-row", data: { model: m.name } }),
               empty: "no model registered yet" }));
}

/** "metric 0.31 (base +0.05, production −0.01)" for each candidate metric. */
function evaluationSummary(evaluation) {
  const scores = evaluation?.scores;
  if (!scores?.candidate) return dash;
  return h("ul", { class: "plain" }, Object.entries(scores.candidate).sort().map(([metric, v]) => {
    const against = ["base", "production"].filter((s) => typeof scores[s]?.[metric] === "number")
      .map((s) => `${s} ${fmtDelta(v, scores[s][metric])}`);
    return h("li", null, `${metric} ${fmtNum(v)}`, against.length ? h("span", { class: "muted" }, ` (${against.join(", ")})`) : null);
  }));
}

export async function modelPage(view, ctx) {
  const [name] = ctx.params;
  const base = `models/${encodeURIComponent(name)}`;
  const content = h("div");
  view.append(h("h1", null, "Model ", h("span", { testid: "model-name" }, name)), content);

  async function render() {
    const model = await api(base);
    const aliases = model.aliases || {};
    const versionPath = (v) => `${base}/${encodeURIComponent(v.version)}`;
    const post = (v, verb, json) => api(`${versionPath(v)}/${verb}`, { method: "POST", json });
    const may = model.caller_may || {};
    const actions = (v) => {
      if (!may.approve) return h("span", { class: "muted", testid: "no-actions" }, "approvers act here");
      const inProduction = aliases.production === v.version;
      const unevaluated = ["unevaluated", "evaluating", "held"].includes(v.status);  // no verdict yet: nothing to promote
      return h("span", { class: "actions" },
        // the registry says which (unevaluated, held, a gate quarantine on point values): model_registry.reevaluable
        v.reevaluable && v.status !== "evaluating" ? action({
          label: "Re-evaluate", testid: "action-reevaluate", question: `Evaluate ${name} ${v.version} again?`,
          run: () => post(v, "reevaluate", {}), done: render,
        }) : null,
        v.status === "candidate" ? action({
          label: "Approve", testid: "action-approve", question: `Approve ${name} ${v.version}?`,
          input: { placeholder: "note" }, run: (note) => post(v, "approve", { note: note || "" }), done: render,
        }) : null,
        v.status !== "quarantined" && !unevaluated && !inProduction ? action({
          label: "Promote", testid: "action-promote", question: `Point production at ${name} ${v.version}?`,
          run: () => post(v, "promote", { alias: "production" }), done: render,
        }) : null,
        // The production version is retired by promoting or rolling back to another one first.
        !["archived", "quarantined"].includes(v.status) && !unevaluated && !inProduction ? action({
          label: "Archive", testid: "action-archive", question: `Archive ${name} ${v.version}?`,
          input: { placeholder: "reason", required: true }, run: (reason) => post(v, "archive", { reason }), done: render,
        }) : null,
        v.status !== "quarantined" && !inProduction ? action({
          label: "Quarantine", testid: "action-quarantine", danger: true,
          question: `Quarantine ${name} ${v.version}? It can never be promoted or served again.`,
          input: { placeholder: "reason", required: true }, run: (reason) => post(v, "quarantine", { reason }), done: render,
        }) : null);
    };
    const versions = model.versions || [];
    const history = Object.entries(model.alias_history || {}).flatMap(([alias, moves]) =>
      moves.map((m) => ({ alias, ...m }))).sort((a, b) => (b.at ?? 0) - (a.at ?? 0));
    const rollbackTo = h("select", { testid: "rollback-to" }, h("option", { value: "" }, "the previous production version"),
      versions.filter((v) => !["quarantined", "unevaluated", "evaluating", "held"].includes(v.status) && v.version !== aliases.production)
        .map((v) => h("option", { value: v.version }, v.version)));

    fill(content,
      h("div", { class: "toolbar" },
        h("span", null, "aliases: "),
        Object.keys(aliases).length
          ? Object.entries(aliases).map(([alias, version]) => h("span", { class: "alias", testid: "alias", data: { alias, version } },
            `${alias} → ${version}`))
          : h("span", { class: "muted" }, "none"),
        h("span", { class: "spacer" }),
        aliases.production && may.approve ? h("span", null, "roll back production to ", rollbackTo, " ", action({
          label: "Roll back", testid: "action-rollback", danger: true, question: "Move production back?",
          run: () => api(`${base}/rollback`, { method: "POST", json: { alias: "production", to: rollbackTo.value || null } }),
          done: render,
        })) : null),
      table([
        ["version", (v) => h("strong", null, v.version)],
        ["status", (v) => badge(v.status, "version-status")],
        ["aliases", (v) => Object.keys(aliases).filter((a) => aliases[a] === v.version).map((a) => h("span", { class: "alias" }, a))],
        ["evaluation (candidate vs base, production)", (v) => evaluationSummary(v.evaluation)],
        ["run", (v) => (v.run_id ? link(["runs", v.run_id], v.run_id) : dash)],
        ["registered", (v) => fmtTime(v.registered_at)],
        ["", (v) => link(["lineage", name, v.version], "lineage")],
        ["actions", actions],
      ], versions, { testid: "versions", rowProps: (v) => ({ testid: "version-row", data: { version: v.version, status: v.status } }) }),
      history.length ? section("Alias history", table([
        ["when", (m) => fmtTime(m.at)],
        ["alias", (m) => m.alias],
        ["moved", (m) => `${m.previous ?? "(none)"} → ${m.version}`],
        ["by", (m) => m.actor ?? dash],
        ["why", (m) => m.reason ?? dash],
      ], history, { testid: "alias-history" })) : null,
    );
  }
  await render();
}
