// #/lineage/<name>/<version> — where a model version came from: the dropped file → dataset → run →
// version, as boxes in columns (one column per hop) joined by arrows.

import { api } from "../api.js";
import { h, link } from "../dom.js";

const KIND_LABEL = { model: "model version", run: "training run", dataset: "dataset", drop: "dropped file" };

function linkFor(node) {
  if (node.kind === "run") return link(["runs", node.id], "open run");
  if (node.kind === "dataset") return link(["datasets", node.id], "open dataset");
  if (node.kind === "model") {
    const name = node.details?.name ?? node.id.split("@")[0];
    return link(["models", name], "open model");
  }
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
        h("dl", null, Object.entries(node.details || {}).filter(([, v]) => typeof v !== "object" || v === null)
          .map(([k, v]) => [h("dt", null, k), h("dd", null, String(v))])),
        linkFor(node)))),
    ])),
  );
}
