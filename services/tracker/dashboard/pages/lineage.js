// #/lineage/<name>/<version> — where a model version came from: the dropped file → dataset → run →
// version, as boxes in columns (one column per hop) joined by arrows.

import { api } from "../api.js";
import { fmtNum, fmtTime, h, link } from "../dom.js";

const KIND_LABEL = { model: "model version", run: "training run", dataset: "dataset", drop: "dropped file" };

/** A detail's value as one line: lists joined, maps as "key value", times as dates. */
function compact(key, value) {
  if (Array.isArray(value)) return value.map((v) => compact("", v)).join(", ");
  if (value && typeof value === "object") {
    return Object.entries(value).filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${k} ${compact(k, v)}`).join(", ");
  }
  if (typeof value === "number") return key.endsWith("_at") ? fmtTime(value) : fmtNum(value);
  return String(value);
}

function linkFor(node, model) {
  if (node.kind === "run") return link(["runs", node.label], "open run");
  if (node.kind === "dataset") return link(["datasets", node.label], "open dataset");
  if (node.kind === "model") return link(["models", model], "open model");
  return null;
}

/**
 * Columns in the order the data flowed (dropped file first, model version last), whichever way the
 * edges point: each node's column is its distance from the model version, walking edges both ways.
 */
function columnsOf(nodes, edges) {
  const start = nodes.find((n) => n.kind === "model") ?? nodes[0];
  const depth = new Map(start ? [[start.id, 0]] : []);
  let frontier = [...depth.keys()];
  while (frontier.length) {
    const next = [];
    for (const id of frontier) {
      for (const e of edges) {
        const other = e.from === id ? e.to : e.to === id ? e.from : null;
        if (other !== null && !depth.has(other)) {
          depth.set(other, depth.get(id) + 1);
          next.push(other);
        }
      }
    }
    frontier = next;
  }
  const deepest = Math.max(0, ...depth.values());
  const columns = [];
  for (const node of nodes) (columns[deepest - (depth.get(node.id) ?? deepest)] ??= []).push(node);
  return columns.filter(Boolean);
}

export default async function lineagePage(view, ctx) {
  const [name, version] = ctx.params;
  const { nodes, edges } = await api(`lineage/${encodeURIComponent(name)}/${encodeURIComponent(version)}`);
  const columns = columnsOf(nodes, edges);
  view.append(
    h("h1", null, `Lineage of ${name} ${version}`),
    h("div", { class: "lineage", testid: "lineage" }, columns.map((column, i) => [
      i ? h("div", { class: "arrow", "aria-hidden": "true" }, "→") : null,
      h("div", { class: "lineage-column" }, column.map((node) => h("article",
        { class: `node node-${node.kind}`, testid: "lineage-node", data: { kind: node.kind, id: node.id } },
        h("header", null, KIND_LABEL[node.kind] ?? node.kind),
        h("strong", null, node.label ?? node.id),
        node.uri ? h("code", null, node.uri) : null,
        h("dl", null, Object.entries(node.details || {}).filter(([, v]) => v !== null && v !== undefined)
          .map(([k, v]) => [h("dt", null, k), h("dd", null, compact(k, v))])),
        linkFor(node, name)))),
    ])),
  );
}
