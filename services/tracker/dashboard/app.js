// The dashboard's shell: hash routes to pages, the token prompt, polling that stops when the page
// is left. A page is `async (view, ctx) => void`; it fills `view` (a fresh element per visit, so a
// slow answer for a page already left lands in a detached element and is simply dropped).

import { adoptTokenFromUrl, api, ApiError, setToken, whenUnauthorized } from "./api.js";
import { errorBox, h } from "./dom.js";
import comparePage from "./pages/compare.js";
import { datasetPage, datasetsPage } from "./pages/datasets.js";
import lineagePage from "./pages/lineage.js";
import { modelPage, modelsPage } from "./pages/models.js";
import newRunPage from "./pages/new.js";
import privacyPage from "./pages/privacy.js";
import runPage from "./pages/run.js";
import runsPage from "./pages/runs.js";
import tenantsPage from "./pages/tenants.js";

const ROUTES = [
  [/^\/runs$/, runsPage, "runs"],
  [/^\/runs\/([^/]+)$/, runPage, "runs"],
  [/^\/datasets$/, datasetsPage, "datasets"],
  [/^\/datasets\/([^/]+)$/, datasetPage, "datasets"],
  [/^\/models$/, modelsPage, "models"],
  [/^\/models\/([^/]+)$/, modelPage, "models"],
  [/^\/compare$/, comparePage, "runs"],
  [/^\/lineage\/([^/]+)\/([^/]+)$/, lineagePage, "models"],
  [/^\/privacy$/, privacyPage, "privacy"],
  [/^\/new$/, newRunPage, "new"],
  [/^\/tenants$/, tenantsPage, "tenants"],
];

const POLL_MS = 2000;
const main = document.getElementById("view");
const authBox = document.getElementById("auth");
let visit = null; // the current page visit: {alive, timers}

/** What a page gets besides its element: route params, the query, and polling tied to the visit. */
function context(params, query, current) {
  return {
    params,
    query,
    /** False once the page has been left: a page's own loops stop on it. */
    alive: () => current.alive,
    /** Call `fn` every `ms` (after the previous call finished) until the page is left; skipped
     * while the tab is hidden. A failing poll shows its error and keeps polling. */
    every(fn, ms = POLL_MS, onError) {
      const tick = async () => {
        if (!current.alive) return;
        if (!document.hidden) {
          try {
            await fn();
          } catch (err) {
            if (onError) onError(err);
          }
        }
        if (current.alive) current.timers.add(setTimeout(tick, ms));
      };
      current.timers.add(setTimeout(tick, ms));
    },
    /** Rewrite the route's query in the address bar without visiting the page again. */
    setQuery(values) {
      const search = new URLSearchParams();
      for (const [k, v] of Object.entries(values)) if (v) search.set(k, v);
      const text = search.toString();
      history.replaceState(null, "", `#${location.hash.slice(1).split("?")[0]}${text ? `?${text}` : ""}`);
    },
  };
}

async function route() {
  // A link from `ftpipe dashboard` opened in a tab that already shows the dashboard arrives as a
  // hash change, not a page load.
  if (adoptTokenFromUrl()) {
    authBox.hidden = true;
    showWhoami();
  }
  if (visit) {
    visit.alive = false;
    visit.timers.forEach(clearTimeout);
  }
  const current = (visit = { alive: true, timers: new Set() });
  const [path, search = ""] = (location.hash.slice(1) || "/runs").split("?");
  const view = h("div", { class: "page" });
  main.replaceChildren(view);
  const match = ROUTES.map(([re, page, nav]) => [re.exec(path), page, nav]).find(([m]) => m);
  if (!match) {
    view.append(errorBox(`no page ${path}: see the links above`));
    return;
  }
  const [found, page, nav] = match;
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
  const params = found.slice(1).map(decodeURIComponent);
  try {
    await page(view, context(params, new URLSearchParams(search), current));
  } catch (err) {
    // A 401 already opened the token prompt; anything else is said where the page would be.
    view.append(errorBox(err instanceof ApiError && err.status === 401 ? "sign in above to see this page" : err.message));
    if (!(err instanceof ApiError)) console.error(err);
  }
}

function showTokenPrompt(reason) {
  authBox.querySelector("[data-testid=auth-reason]").textContent = reason;
  if (authBox.hidden) {
    authBox.hidden = false;
    authBox.querySelector("input").focus();
  }
}

authBox.querySelector("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = event.target.elements.token;
  setToken(input.value);
  input.value = "";
  authBox.hidden = true;
  showWhoami();
  route();
});

async function showWhoami() {
  const who = await api("whoami").catch(() => null);
  // who the token or the proxy says, and what it holds (shared/domain/access.py)
  const held = who && (who.admin ? "admin"
    : Object.entries(who.grants || {}).map(([tenant, roles]) => `${roles.join(", ")} in ${tenant}`).join("; "));
  document.querySelector("[data-testid=whoami]").textContent = who ? `${who.subject} (${held || "no roles"})` : "";
}

whenUnauthorized(showTokenPrompt);
adoptTokenFromUrl();
window.addEventListener("hashchange", route);
showWhoami();
route();
