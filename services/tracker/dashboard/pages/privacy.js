// #/privacy — datasets held for privacy sign-off, each with its PII report (figures only: the
// report never holds values) and the approve / reject decision. The signer is the caller's identity.

import { api } from "../api.js";
import { action, facts, fmtNum, fmtTime, fmtUsd, h, link } from "../dom.js";
import { piiFacts } from "./datasets.js";

function card(item) {
  const runId = item.run_id;
  const post = (verb, json) => api(`privacy/${encodeURIComponent(runId)}/${verb}`, { method: "POST", json });
  const dataset = item.dataset || {};
  // The decision stands at once; the run leaves this list when the tracker has recorded the
  // DatasetPrepared / DatasetRejected that the decision published, so meanwhile the card says it.
  const decided = (signoff) => actions.replaceChildren(h("p", { testid: "privacy-decision" },
    `${signoff.decision} by ${signoff.approver}${signoff.note ? `: ${signoff.note}` : ""}`,
    h("span", { class: "muted" }, signoff.decision === "approved" ? " — the run goes on to training." : " — the run stops.")));
  const actions = !item.caller_may?.decide ? h("p", { class: "muted", testid: "privacy-no-decision" },
    "an approver of this tenant decides") : h("div", { class: "actions" },
    action({ label: "Approve", testid: "privacy-approve", question: "Sign off this dataset for training?",
             input: { placeholder: "note" }, run: (note) => post("approve", { note: note || "" }), done: decided }),
    action({ label: "Reject", testid: "privacy-reject", danger: true, question: "Reject this dataset?",
             input: { placeholder: "reason", required: true }, run: (reason) => post("reject", { reason }),
             done: decided }));
  return h("article", { class: "card", testid: "privacy-item", data: { runId } },
    h("h2", null, "Run ", link(["runs", runId], runId)),
    facts([
      ["recipe", item.recipe ? `${item.recipe.name} v${item.recipe.version}` : undefined],
      ["tenant", item.tenant ?? undefined],
      ["dataset", dataset.id ? h("code", null, dataset.id) : undefined],
      ["rows", Object.entries(dataset.counts || {}).map(([k, v]) => `${k} ${fmtNum(v)}`).join(", ") || undefined],
      ["waiting since", fmtTime(item.requested_at)],
      ["cost estimate", item.cost_estimate?.cost !== undefined ? fmtUsd(item.cost_estimate.cost) : undefined],
    ]),
    h("h3", null, "PII report"),
    piiFacts(item.pii || {}),
    actions);
}

export default async function privacyPage(view) {
  const waiting = await api("privacy");
  view.append(h("h1", null, "Privacy sign-off"), h("div", { class: "cards", testid: "privacy-list" },
    waiting.length ? waiting.map(card) : h("p", { class: "muted", testid: "privacy-empty" }, "No dataset is waiting for sign-off.")));
}
