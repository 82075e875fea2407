// Building the page from data without ever parsing it as HTML: every string from the server ends
// up in a text node or an attribute value, so a run name like "<img onerror=...>" stays text.

/**
 * h("a", {href: "#/runs", class: "x", testid: "run-link", onclick: fn}, "text", child, [more])
 * `testid` sets data-testid, `data` sets data-* attributes, `on<event>` adds a listener, `value`
 * and `checked` set the live property; false / null / undefined props and children are skipped.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "testid") el.dataset.testid = value;
    else if (key === "data") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "value" || key === "checked") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** Replace an element's children (skipping false / null / undefined, as h() does). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** A link to a dashboard route; every path segment is encoded. */
export function link(segments, text, props = {}) {
  const href = "#/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
  return h("a", { href, ...props }, text ?? segments[segments.length - 1]);
}

// ------------------------------------------------------------------ formatting

export const dash = "—";

export function fmtNum(x, digits = 4) {
  if (x === undefined || x === null || Number.isNaN(x)) return dash;
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  const abs = Math.abs(x);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return Number(x.toPrecision(digits)).toExponential(); // 2e-4, 1.234e-5
  return String(Number(x.toPrecision(digits)));
}

export function fmtUsd(x) {
  if (x === undefined || x === null) return dash;
  return "$" + (Math.abs(x) < 0.01 && x !== 0 ? x.toPrecision(2) : x.toFixed(2));
}

export function fmtPct(fraction, digits = 1) {
  if (fraction === undefined || fraction === null) return dash;
  const pct = fraction * 100;
  return (pct !== 0 && Math.abs(pct) < 0.1 ? pct.toPrecision(2) : pct.toFixed(digits)) + " %";
}

export function fmtTime(epoch) {
  if (!epoch) return dash;
  return new Date(epoch * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtDuration(seconds) {
  if (seconds === undefined || seconds === null) return dash;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  const hours = Math.floor(s / 3600);
  return `${hours} h ${String(Math.round((s % 3600) / 60)).padStart(2, "0")} min`;
}

/** A signed difference, or a dash when a side is missing. */
export function fmtDelta(a, b) {
  if (typeof a !== "number" || typeof b !== "number") return dash;
  const d = a - b;
  return (d > 0 ? "+" : "") + fmtNum(d);
}

// ------------------------------------------------------------------ widgets

export function badge(status, testid = "status") {
  return h("span", { class: `badge badge-${String(status || "unknown").replace(/[^a-z_]/gi, "")}`, testid },
    status || "unknown");
}

export function progressBar(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  const fill = h("span", { class: "progress-fill" });
  fill.style.width = `${pct}%`; // CSSOM: allowed by the page's content security policy
  return h("span", { class: "progress", testid: "progress", data: { value: pct.toFixed(1) }, title: label },
    fill, h("span", { class: "progress-label" }, label ?? `${pct.toFixed(0)} %`));
}

/** A table: columns = [[heading, row => cell]]; `rowProps(row)` adds attributes to each <tr>. */
export function table(columns, rows, { testid, rowProps, empty = "nothing yet" } = {}) {
  const body = h("tbody");
  fillRows(body, columns, rows, rowProps, empty);
  return h("table", { testid }, h("thead", null, h("tr", null, columns.map(([title]) => h("th", null, title)))), body);
}

/** Replace a table's rows (for auto-refresh without losing the page's other state). */
export function fillRows(body, columns, rows, rowProps, empty = "nothing yet") {
  body.replaceChildren(...(rows.length
    ? rows.map((row) => h("tr", rowProps ? rowProps(row) : null, columns.map(([, cell]) => h("td", null, cell(row)))))
    : [h("tr", null, h("td", { colspan: columns.length, class: "muted" }, empty))]));
}

/** A definition list of label → value pairs (values may be nodes). */
export function facts(pairs, testid) {
  return h("dl", { class: "facts", testid },
    pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [h("dt", null, k), h("dd", null, v ?? dash)]));
}

export function errorBox(message, testid = "error") {
  return h("div", { class: "error", role: "alert", testid }, message);
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", null, title), ...children);
}

/**
 * A button that asks before it acts: the first click opens an inline confirmation (with a text
 * field when `input` is given: {placeholder, required}); "Confirm" calls `run(text)`. The server's
 * error message is shown beside the button; on success `done(result)` is called.
 * Test ids: `<testid>` (the button), `<testid>-input`, `<testid>-confirm`, `action-error`.
 */
export function action({ label, testid, question, input, danger = false, disabled = false, run, done }) {
  const root = h("span", { class: "action" });
  const error = h("span", { class: "action-error", testid: "action-error", role: "alert" });
  const button = h("button", { class: danger ? "danger" : null, testid, disabled, onclick: ask }, label);
  root.append(button, error);

  function ask() {
    error.textContent = "";
    const field = input ? h("input", { type: "text", placeholder: input.placeholder, testid: `${testid}-input` }) : null;
    const confirm = h("button", { class: danger ? "danger" : "primary", testid: `${testid}-confirm` }, "Confirm");
    const cancel = h("button", { onclick: () => root.replaceChildren(button, error) }, "Cancel");
    confirm.addEventListener("click", async () => {
      const text = field ? field.value.trim() : undefined;
      if (input && input.required && !text) {
        error.textContent = `${input.placeholder} is required`;
        return;
      }
      confirm.disabled = true;
      error.textContent = "";
      try {
        const result = await run(text);
        root.replaceChildren(button, error);
        if (done) await done(result);
      } catch (err) {
        error.textContent = err.message;
        confirm.disabled = false;
      }
    });
    fill(root, h("span", { class: "confirm" }, question, field, confirm, cancel), error);
    (field || confirm).focus();
  }
  return root;
}
