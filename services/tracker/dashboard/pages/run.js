// #/runs/<id> — one run, live: charts grow from /metrics?after_step=N and the events list from
// /events?after_seq=N every two seconds; a new event (the only way a run changes) refetches the run
// for its status, checkpoints, alerts and evaluation.

import { api, ApiError, qs } from "../api.js";
import { stepChart } from "../charts.js";
import {
  action, badge, dash, errorBox, facts, fill, fmtDuration, fmtNum, fmtTime, h, link, section, table,
} from "../dom.js";
import { costText, progressOf } from "./runs.js";
import { scoresTable } from "./scores.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const CHARTS = [ // [title, keys plotted, test id]
  ["Loss", ["loss", "val_loss"], "chart-loss"],
  ["Gradient norm", ["grad_norm"], "chart-grad-norm"],
  ["Learning rate", ["lr"], "chart-lr"],
  ["Throughput (tokens/s)", ["tokens_per_s"], "chart-throughput"],
];

/**
 * The run, or null when the page is left first. A run just started from the no-code form exists
 * once the tracker has recorded its JobSubmitted (a moment later): until then the page says so and
 * keeps asking.
 */
async function firstLoad(view, ctx, path, runId) {
  let waiting = null;
  for (;;) {
    try {
      const run = await api(path);
      if (waiting) waiting.remove();
      return run;
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) throw err;
    }
    if (!waiting) {
      waiting = h("p", { class: "muted", testid: "run-waiting" }, `No run ${runId} yet: a run just started appears `
        + "as soon as the tracker records it, and this page keeps looking. The Runs page lists every run.");
      view.append(waiting);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (!ctx.alive()) return null;
  }
}

/** The run's resolved recipe (fixed for the run's life), folded away: it has a hundred settings. */
function hyperparametersOf(run) {
  const rows = Object.entries(run.hyperparameters || {}).sort();
  return section("Hyperparameters", h("details", null, h("summary", null, `the resolved recipe: ${rows.length} settings`),
    table([["key", ([k]) => k], ["value", ([, v]) => JSON.stringify(v)]], rows, { testid: "hyperparameters" })));
}

export default async function runPage(view, ctx) {
  const [runId] = ctx.params;
  const path = `runs/${encodeURIComponent(runId)}`;
  let run = await firstLoad(view, ctx, path, runId);
  if (!run) return;
  let lastStep = null;
  let lastSeq = Math.max(0, ...(run.events || []).map((e) => e.seq));

  const header = h("div");
  const details = h("div", { class: "grid-2" });
  const charts = CHARTS.map(([title, keys, testid]) => ({ keys, chart: stepChart(title, keys, { testid }) }));
  const eventRows = h("tbody");
  const live = h("span", { class: "muted", testid: "live" });

  function addEvents(events) {
    for (const e of events) {
      eventRows.prepend(h("tr", { testid: "event-row", data: { seq: e.seq } },
        h("td", null, e.seq), h("td", null, fmtTime(e.at)), h("td", null, e.type), h("td", null, e.summary ?? "")));
    }
  }

  // Built once, not with the rest of the header: a poll that brings a new event re-renders the
  // header, which must not close a confirmation the user is in the middle of.
  const cancel = action({
    label: "Cancel run", testid: "cancel-run", danger: true,
    question: `Cancel ${runId}? The trainer checkpoints and stops.`,
    run: () => api(`${path}/cancel`, { method: "POST", json: {} }),
    done: reload,
  });
  const status = h("span", { class: "toolbar" });

  function renderRun() {
    const t = run.training || {};
    cancel.hidden = TERMINAL.includes(run.status) || !run.caller_may?.cancel;
    fill(status, badge(run.status, "run-status"), h("span", { class: "muted", testid: "run-sub-state" }, run.sub_state ?? ""),
      run.model ? link(["lineage", run.model.name, run.model.version], "lineage") : null);
    fill(header,
      run.error ? errorBox(run.error, "run-error") : null,
      facts([
        ["progress", progressOf(run)],
        ["step", t.total_steps ? `${t.step ?? 0} of ${t.total_steps}` : fmtNum(t.step)],
        ["ETA", run.status === "running" ? fmtDuration(t.eta_s) : dash],
        ["cost", costText(run)],
        ["recipe", run.recipe ? `${run.recipe.name} v${run.recipe.version} (${run.recipe.hash ?? ""})` : dash],
        ["base model", run.base_model ?? dash],
        ["tenant", run.tenant ?? dash],
        ["dataset", run.dataset?.id ? link(["datasets", run.dataset.id], run.dataset.id) : dash],
        ["model", run.model ? [link(["models", run.model.name], `${run.model.name} ${run.model.version}`), " ",
          badge(run.model.status, "model-status")] : dash],
        ["created", fmtTime(run.created_at)],
        ["updated", fmtTime(run.updated_at)],
      ], "run-facts"),
    );
    const evaluation = run.evaluation;
    fill(details,
      section("Evaluation", evaluation?.error
        // An evaluation that errored is no verdict: the version waits, unevaluated, for a re-evaluation.
        ? h("div", { testid: "evaluation" },
          h("p", null, "Gate ", badge("unevaluated", "gate")),
          h("p", { class: "error", testid: "evaluation-error" },
            `evaluation errored on ${evaluation.attempts} attempts (no verdict): ${evaluation.error}`))
        : evaluation
        ? h("div", { testid: "evaluation" },
          h("p", null, "Gate ", badge(evaluation.passed ? "passed" : "failed", "gate")),
          scoresTable(evaluation.scores || {}),
          h("h3", null, "Gate reasons"),
          h("ul", { testid: "gate-reasons" }, (evaluation.reasons || []).map((r) => h("li", null, r))))
        : h("p", { class: "muted" }, "not evaluated yet")),
      section("Checkpoints", table([
        ["step", (c) => c.step],
        ["metrics", (c) => Object.entries(c.metrics || {}).map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ") || dash],
        ["uri", (c) => h("code", null, c.uri)],
      ], run.checkpoints || [], { testid: "checkpoints", empty: "no checkpoint yet" })),
      section("Alerts", table([
        ["step", (a) => a.step],
        ["kind", (a) => a.kind],
        ["", (a) => (a.stop ? badge("stopped") : "")],
        ["message", (a) => a.message],
      ], run.alerts || [], { testid: "alerts", empty: "no alerts" })),
    );
  }

  async function reload() {
    run = await api(path);
    renderRun();
  }

  async function poll() {
    const [rows, events] = await Promise.all([
      api(`${path}/metrics${qs({ after_step: lastStep })}`),
      api(`${path}/events${qs({ after_seq: lastSeq })}`),
    ]);
    if (rows.length) {
      charts.forEach(({ keys, chart }) => chart.append(rows, keys));
      lastStep = rows[rows.length - 1].step;
    }
    if (events.length) {
      addEvents(events);
      lastSeq = events[events.length - 1].seq;
      await reload();
    }
    live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  }

  renderRun();
  addEvents(run.events || []);
  view.append(
    h("div", { class: "toolbar" },
      h("h1", null, "Run ", h("span", { testid: "run-id" }, runId)), status, h("span", { class: "spacer" }),
      h("a", { href: `#/compare?runs=${encodeURIComponent(runId)}` }, "compare with…"), cancel),
    header,
    h("section", { class: "charts", testid: "charts" }, charts.map(({ chart }) => chart.el)),
    live,
    details,
    section("Events", h("div", { class: "scroll" }, h("table", { testid: "events" },
      h("thead", null, h("tr", null, ["seq", "at", "type", "summary"].map((c) => h("th", null, c)))), eventRows))),
    hyperparametersOf(run),
  );
  await poll();
  ctx.every(poll, 2000, (err) => { live.textContent = `live updates failing: ${err.message}`; });
}
