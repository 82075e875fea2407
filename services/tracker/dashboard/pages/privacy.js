// #/privacy — datasets held for privacy sign-off, each with its PII report (figures only: the
// report never holds values) and the approve / reject decision. The signer is the caller's identity.

import { api } from "../api.js";
import { action, facts, fmtNum, fmtTime, fmtUsd, h, link } from "../dom.js";
import { piiFacts } from "./datasets.js";

export default async function privacyPage(view) {
  const list = h("div", { class: "cards", testid: "privacy-list" });
  view.append(h("h1", null, "Privacy sign-off"), list);

  async function render() {
    const waiting = await api("privacy");
    list.replaceChildren(...(waiting.length ? waiting.map(card) : [
      h("p", { class: "muted", testid: "privacy-empty" }, "No dataset is waiting for sign-off.")]));
  }

  function card(item) {
    const runId = item.run_id;
    const post = (verb, json) => api(`privacy/${encodeURIComponent(runId)}/${verb}`, { method: "POST", json });
    const dataset = item.dataset || {};
    const counts = dataset.counts || {};
    return h("article", { class: "card", testid: "privacy-item", data: { runId } },
      h("h2", null, "Run ", link(["runs", runId], runId)),
      facts([
        ["recipe", item.recipe ? `${item.recipe.name} v${item.recipe.version}` : undefined],
        ["dataset", dataset.id ? h("code", null, dataset.id) : undefined],
        ["rows", Object.entries(counts).map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ") || undefined],
        ["waiting since", fmtTime(item.requested_at)],
        ["cost estimate", item.cost_estimate?.cost !== undefined ? fmtUsd(item.cost_estimate.cost) : undefined],
      ]),
      h("h3", null, "PII report"),
      piiFacts({ ...item.pii, counts: item.pii?.counts ?? item.pii_counts,
                 residual_rate: item.pii?.residual_rate ?? item.residual_rate }),
      h("div", { class: "actions" },
        action({ label: "Approve", testid: "privacy-approve", question: "Sign off this dataset for training?",
                 input: { placeholder: "note" }, run: (note) => post("approve", { note: note || "" }), done: render }),
        action({ label: "Reject", testid: "privacy-reject", danger: true, question: "Reject this dataset?",
                 input: { placeholder: "reason", required: true }, run: (reason) => post("reject", { reason }),
                 done: render })));
  }

  await render();
}
