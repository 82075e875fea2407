// #/new — the no-code path: upload a dataset file, pick a recipe, change a few hyperparameters,
// start the run (the same submission as `ftpipe submit`), then watch it on its page.

import { api } from "../api.js";
import { errorBox, h } from "../dom.js";

/** The typed value of a field, by the type of the recipe's default (a blank field is the default). */
function parse(text, fallback) {
  const value = text.trim();
  if (value === "") return fallback;
  if (typeof fallback === "number" || fallback === null) {
    const n = Number(value);
    if (!Number.isNaN(n)) return n;
    if (typeof fallback === "number") throw new Error(`“${value}” is not a number`);
  }
  return value;
}

export default async function newRunPage(view) {
  const recipes = await api("recipes");
  const byName = new Map(recipes.map((r) => [r.name, r]));
  const recipe = h("select", { name: "recipe", testid: "new-recipe", required: true },
    recipes.map((r) => h("option", { value: r.name }, `${r.name} v${r.version}`)));
  const description = h("p", { class: "muted", testid: "recipe-description" });
  const hyper = h("div", { class: "hyper", testid: "hyperparameters" });
  const file = h("input", { type: "file", name: "file", testid: "new-file", required: true,
                            accept: ".jsonl,.json,.csv,.parquet" });
  const tenant = h("input", { type: "text", name: "tenant", value: "default", testid: "new-tenant" });
  const message = h("div");
  const submit = h("button", { type: "submit", class: "primary", testid: "new-submit" }, "Start run");

  function showRecipe() {
    const r = byName.get(recipe.value);
    if (!r) return;
    description.textContent = [r.description, r.base_model && `base ${r.base_model}`, r.method && `method ${r.method}`,
      r.adapter && `adapter ${r.adapter}`, r.privacy_review && "held for privacy sign-off"]
      .filter(Boolean).join(" · ");
    hyper.replaceChildren(...Object.entries(r.hyperparameters || {}).map(([key, value]) => {
      const input = typeof value === "boolean"
        ? h("input", { type: "checkbox", checked: value })
        : h("input", { type: "text", value: value === null ? "" : String(value), placeholder: value === null ? "not set" : null });
      input.dataset.key = key;
      input.dataset.testid = "hp-input";
      return h("label", null, h("span", null, key), input);
    }));
  }

  /** Only the fields that differ from the recipe travel, as dotted keys. */
  function overrides() {
    const defaults = byName.get(recipe.value).hyperparameters || {};
    const out = {};
    for (const input of hyper.querySelectorAll("input")) {
      const key = input.dataset.key;
      const value = input.type === "checkbox" ? input.checked : parse(input.value, defaults[key]);
      if (value !== defaults[key]) out[key] = value;
    }
    return out;
  }

  const form = h("form", { class: "card form", testid: "new-run-form" },
    h("label", null, h("span", null, "dataset file"), file),
    h("label", null, h("span", null, "recipe"), recipe), description,
    h("fieldset", null, h("legend", null, "hyperparameters (leave as is for the recipe's values)"), hyper),
    h("label", null, h("span", null, "tenant"), tenant),
    submit, message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    try {
      const data = new FormData();
      data.set("file", file.files[0]);
      data.set("recipe", recipe.value);
      data.set("overrides", JSON.stringify(overrides()));
      data.set("tenant", tenant.value.trim() || "default");
      submit.disabled = true;
      const { run_id: runId } = await api("runs", { method: "POST", form: data });
      location.hash = `#/runs/${encodeURIComponent(runId)}`;
    } catch (err) {
      message.replaceChildren(errorBox(err.message, "new-error"));
      submit.disabled = false;
    }
  });
  recipe.addEventListener("change", showRecipe);
  showRecipe();
  view.append(h("h1", null, "New run"), recipes.length ? form
    : errorBox("the tracker knows no recipe: add one under recipes/ (see the README)"));
}
