// #/tenants — per-tenant totals: jobs, how they ended, GPU hours and cost.

import { api } from "../api.js";
import { fmtNum, fmtPct, fmtUsd, h, table } from "../dom.js";

export default async function tenantsPage(view) {
  const tenants = await api("tenants");
  view.append(h("h1", null, "Tenants"), table([
    ["tenant", (t) => h("a", { href: `#/runs?tenant=${encodeURIComponent(t.tenant)}` }, t.tenant)],
    ["jobs", (t) => fmtNum(t.jobs)],
    ["running", (t) => fmtNum(t.running)],
    ["succeeded", (t) => fmtNum(t.succeeded)],
    ["failed", (t) => fmtNum(t.failed)],
    ["cancelled", (t) => fmtNum(t.cancelled)],
    ["success rate", (t) => fmtPct(t.success_rate)],
    ["GPU hours", (t) => fmtNum(t.gpu_hours, 3)],
    ["cost", (t) => fmtUsd(t.cost_usd)],
  ], tenants, { testid: "tenants-table", rowProps: (t) => ({ testid: "tenant-row", data: { tenant: t.tenant } }),
                empty: "no jobs yet" }));
}
