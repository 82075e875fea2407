// The evaluation comparison: each metric for the base model, the candidate and the production
// version, and the candidate's difference from each.

import { fmtDelta, fmtNum, h, table } from "../dom.js";

const SIDES = ["base", "candidate", "production"];

export function scoresTable(scores) {
  const sides = [...SIDES.filter((s) => s in scores), ...Object.keys(scores).filter((s) => !SIDES.includes(s))];
  const metrics = [...new Set(sides.flatMap((s) => Object.keys(scores[s] || {})))].sort();
  const value = (side, metric) => scores[side]?.[metric];
  const columns = [
    ["metric", (m) => m],
    ...sides.map((side) => [side, (m) => fmtNum(value(side, m))]),
    ...["base", "production"].filter((s) => s in scores && "candidate" in scores).map((side) => [
      `Δ vs ${side}`, (m) => h("span", { class: "delta" }, fmtDelta(value("candidate", m), value(side, m)))]),
  ];
  return table(columns, metrics, {
    testid: "scores", empty: "no scores", rowProps: (m) => ({ testid: "score-row", data: { metric: m } }),
  });
}
