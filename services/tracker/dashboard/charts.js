// Line charts over training steps, drawn by the vendored uPlot (assets/vendor/uplot, a global
// `uPlot` loaded before this module). A chart keeps its own columns and grows as rows arrive, so a
// polling page appends points without redrawing the page.

import { fmtNum, h } from "./dom.js";

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const HEIGHT = 200;
// Steps are whole numbers: ticks at 1, 2, 5, 10, 20, 50, … (uPlot's default would put them at 1.5).
const STEP_INCREMENTS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p)).sort((a, b) => a - b);

/**
 * A chart of `labels` (one line each) against the step. `el` goes into the page; the plot is made
 * once the element is laid out (uPlot needs a width) and follows its size. `data-points` on `el`
 * says how many steps it shows (tests read it).
 */
export function stepChart(title, labels, { testid } = {}) {
  const target = h("div", { class: "chart-plot" });
  const el = h("figure", { class: "chart", testid, data: { points: "0" } }, h("figcaption", null, title), target);
  const columns = [[], ...labels.map(() => [])];
  let plot = null;

  new ResizeObserver(() => {
    const width = target.clientWidth;
    if (!width) return;
    if (plot) plot.setSize({ width, height: HEIGHT });
    else plot = new uPlot(options(labels, width), columns, target);
  }).observe(target);

  function redraw() {
    el.dataset.points = String(columns[0].length);
    if (plot) plot.setData(columns);
  }

  return {
    el,
    /** Add rows ({step, [key]: value}) whose step is past the last one shown; keys follow `labels`. */
    append(rows, keys) {
      const steps = columns[0];
      for (const row of rows) {
        if (steps.length && row.step <= steps[steps.length - 1]) continue;
        steps.push(row.step);
        keys.forEach((key, i) => columns[i + 1].push(typeof row[key] === "number" ? row[key] : null));
      }
      redraw();
    },
    /** Replace everything: `data` = [steps, ...one column per label]. */
    set(data) {
      data.forEach((column, i) => columns[i].splice(0, columns[i].length, ...column));
      redraw();
    },
  };
}

/** Columns for overlaying one metric of several runs: the union of their steps, gaps as null. */
export function alignByStep(rowsPerRun, key) {
  const steps = [...new Set(rowsPerRun.flatMap((rows) => rows.map((r) => r.step)))].sort((a, b) => a - b);
  const index = new Map(steps.map((s, i) => [s, i]));
  const columns = rowsPerRun.map((rows) => {
    const column = new Array(steps.length).fill(null);
    for (const row of rows) if (typeof row[key] === "number") column[index.get(row.step)] = row[key];
    return column;
  });
  return [steps, ...columns];
}

function options(labels, width) {
  return {
    width,
    height: HEIGHT,
    scales: { x: { time: false } },
    axes: [
      { label: "step", labelSize: 14, size: 30, incrs: STEP_INCREMENTS },
      { size: 64, values: (u, splits) => splits.map((v) => fmtNum(v, 3)) },
    ],
    series: [
      { label: "step" },
      ...labels.map((label, i) => ({
        label,
        stroke: PALETTE[i % PALETTE.length],
        width: 1.5,
        spanGaps: true, // val_loss comes every eval_steps only: join its points
        value: (u, v) => fmtNum(v),
      })),
    ],
  };
}
