"""The evaluation benchmark (issue 22): the gate before and after it decided on evidence, on a model
tuned by the demo recipe, for each case (a prepared dataset, the adapter trained on it, its knowledge
probes).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/eval/run.py --case demo DATA ADAPTER PROBES \
        [--case support_b DATA ADAPTER PROBES] [--old-ref 012bae3] [--repeats 3] [--draws 400] \
        [--only decisions timing resample] [--out bench/eval/results.json]

`--demo-state DIR` names the demo's case from a `ftpipe demo` state folder (its bucket's datasets/,
models/support-assistant/<latest>/adapter and probes/).

Sections (`--only` picks some; the others' figures in --out are kept):

- decisions: each case evaluated once by the old code (`--old-ref`, the commit before issue 22, in a
  git worktree: its recipe's probe subsets, its gate on point values) and once by this tree (its
  recipe and sets): every gated metric's point values, interval, and outcome under each.
- timing: the first case evaluated --repeats times by each of: the old code with its recipe's
  subsets; this tree with its full sets and an empty evaluation cache (cold); the same with the
  cache the previous run filled (warm). Fresh processes (bench/eval/worker.py), interleaved (old,
  cold, warm, then cold, warm, old, ...) so that load on the machine hits all alike; medians with the
  min-max spread; per-phase seconds from the evaluator's own timings.
- judge: the first case evaluated by this tree with `eval.judge` naming an OpenAI-compatible endpoint
  (--judge-url/--judge-model; by default `ftpipe serve` started here over SmolLM2-135M-Instruct, the
  only instruct model on this machine: plumbing, not a judge of quality), and the judge's agreement
  with the refusal rules per side (Cohen's kappa, the 2x2 table, how many verdicts were usable).
- resample: how often the old gate would quarantine a model that the full probe sets show is not
  worse. From this tree's full-set evaluation (one answer per probe and side), --draws random
  subsets of each rate's probes of the size the old recipe used, seeded (0, 1, ...): the old rule
  (point values, the old tolerance) on each draw. A draw is what an evaluation with another seed for
  the subset would have seen: greedy answers do not depend on which other probes are asked.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shared.domain.recipe import GateRule  # noqa: E402

from services.evaluator.evidence import RATES, probe_key  # noqa: E402
from services.evaluator.gate import check  # noqa: E402

WORKER = Path(__file__).with_name("worker.py")
RECIPE = "recipes/support-assistant.yaml"
OLD_REF = "012bae3"   # main before issue 22: probe subsets in the demo recipe, the gate on point values


def _old_tree(ref: str) -> Path:
    tree = Path(tempfile.gettempdir()) / f"ftpipe-bench-eval-{ref}"
    if not (tree / "services").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    return tree


def _evaluate(tree: Path, recipe: Path, case: dict, *, cache: Path | None = None, sets: tuple[str, ...] = (),
              env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        out = Path(tmp) / "out.json"
        command = [sys.executable, str(WORKER), "--recipe", str(recipe), "--data", case["data"],
                   "--adapter", case["adapter"], "--probes", case["probes"], "--out", str(out)]
        if cache is not None:
            command += ["--cache", str(cache)]
        for item in sets:
            command += ["--set", item]
        done = subprocess.run(command, env={**os.environ, **(env or {}), "PYTHONPATH": str(tree)}, capture_output=True,
                              text=True)
        if done.returncode:
            raise SystemExit(f"evaluation by {tree} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------ decisions


def _outcomes(run: dict) -> dict[str, str]:
    return {c["metric"]: c["outcome"] for c in run["result"]["gate"]["checks"]}


def decisions(old: dict, new: dict) -> dict:
    """metric -> old and new point values, the new interval, and each gate's outcome."""
    old_out, new_out = _outcomes(old), _outcomes(new)
    table = {}
    for metric in sorted(set(old_out) | set(new_out)):
        row = {}
        for name, run, out in (("old", old, old_out), ("new", new, new_out)):
            scores = run["result"]["scores"]
            interval = run["result"]["intervals"].get("vs_base", {}).get(metric)
            row[name] = {"base": scores.get("base", {}).get(metric), "candidate": scores.get("candidate", {}).get(metric),
                         "outcome": out.get(metric, "not gated"),
                         "interval": None if interval is None or name == "old" else
                         {k: interval[k] for k in ("delta", "low", "high", "n", "method")}}
        table[metric] = row
    return {"gate": {"old": old["result"]["gate"]["outcome"] if "outcome" in old["result"]["gate"] else
                     ("passed" if old["result"]["passed"] else "failed"),
                     "new": new["result"]["gate"]["outcome"], "new_held": new["result"]["gate"].get("held", False)},
            "metrics": table,
            "probes": {side: {suite: len(by_side.get("candidate", [])) for suite, by_side in run["result"]["details"].items()
                              if isinstance(by_side.get("candidate"), list)} for side, run in (("old", old), ("new", new))}}


# ------------------------------------------------------------------------------------ resample


def resample(old: dict, new: dict, draws: int) -> dict:
    """Per rate metric the old rule judged: the share of `draws` old-sized random subsets of the full
    set's probes on which the old rule (point values) fails, beside the new gate's full-set outcome;
    and the share of draws on which any of those block rules fails."""
    from shared.domain.metrics import higher_is_better

    new_out = _outcomes(new)
    details = new["result"]["details"]
    metrics, pools = {}, {}
    for metric, rule in old["rules"].items():
        rate = RATES.get(metric)
        if rate is None or rule.get("tolerance") is None or rule["action"] == "off":
            continue
        old_n = sum(rate.keep(d) for d in old["result"]["details"].get(rate.suite, {}).get("candidate", []))
        by_side = {side: {probe_key(rate.suite, d): bool(d[rate.outcome])
                          for d in details.get(rate.suite, {}).get(side, []) if rate.keep(d)}
                   for side in ("base", "candidate")}
        keys = sorted(set(by_side["base"]) & set(by_side["candidate"]))
        if not old_n or len(keys) <= old_n:
            continue   # the old recipe asked the whole set: nothing to resample
        pools[metric] = (by_side, keys)
        metrics[metric] = {"old_n": old_n, "full_n": len(keys), "rule": rule,
                           "higher_is_better": higher_is_better(metric), "new_outcome": new_out.get(metric)}
    fails: dict[str, list[bool]] = {m: [] for m in metrics}
    for seed in range(draws):
        rng = random.Random(seed)
        for metric, spec in metrics.items():
            by_side, keys = pools[metric]
            chosen = rng.sample(keys, spec["old_n"])
            base = sum(by_side["base"][k] for k in chosen) / len(chosen)
            cand = sum(by_side["candidate"][k] for k in chosen) / len(chosen)
            # the gate's own rule on point values (no interval): what the old gate decided
            found = check(metric, GateRule.model_validate(spec["rule"]), {"base": {metric: base}, "candidate": {metric: cand}},
                          named=True)
            fails[metric].append(found.outcome in ("failed", "warning"))
    blocking = [m for m in metrics if metrics[m]["rule"]["action"] == "block"]
    any_block = [any(fails[m][i] for m in blocking) for i in range(draws)] if blocking else []
    for metric in metrics:
        metrics[metric]["old_fails"] = sum(fails[metric]) / draws
    not_worse = all(metrics[m]["new_outcome"] != "failed" for m in blocking)
    return {"draws": draws, "metrics": metrics,
            "old_gate_quarantines": sum(any_block) / draws if any_block else 0.0,
            "full_sets_show_not_worse": not_worse}


# ------------------------------------------------------------------------------------ timing


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "runs": [round(v, 1) for v in values]}


def timing(old_tree: Path, old_recipe: Path, case: dict, repeats: int) -> dict:
    """Wall seconds of a whole evaluation (both sides) per configuration, interleaved."""
    configs = ["old", "new_cold", "new_warm"]
    walls: dict[str, list[float]] = {c: [] for c in configs}
    phases: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bench-eval-cache-") as tmp:
        warm = Path(tmp) / "warm"
        _evaluate(ROOT, ROOT / RECIPE, case, cache=warm)   # fills the warm cache; not counted
        for r in range(repeats):
            for config in configs[r % 3:] + configs[:r % 3]:
                if config == "old":
                    run = _evaluate(old_tree, old_recipe, case)
                else:
                    cache = warm if config == "new_warm" else Path(tmp) / f"cold-{r}"
                    run = _evaluate(ROOT, ROOT / RECIPE, case, cache=cache)
                walls[config].append(run["wall"])
                phases[config].append(run["result"]["timings"])
                print(f"  timing {config} run {r + 1}: {run['wall']:.1f}s", flush=True)
    out = {}
    for config in configs:
        sides = {side: _summary([sum(v for k, v in t.items() if k.startswith(f"{side}_")) for t in phases[config]])
                 for side in ("base", "candidate")}
        names = sorted({k for t in phases[config] for k in t})
        per_phase = {k: round(statistics.median(t.get(k, 0.0) for t in phases[config]), 1) for k in names}
        out[config] = {"wall": _summary(walls[config]), **sides, "phases": per_phase}
    out["full_over_old"] = {c: round(out[c]["wall"]["median"] / out["old"]["wall"]["median"], 2)
                            for c in ("new_cold", "new_warm")}
    return out


# ------------------------------------------------------------------------------------ judge


def judge(case: dict, url: str | None, model: str | None) -> dict:
    """This tree's evaluation with eval.judge set, and the judge's agreement with the refusal rules."""
    server, opened, env = None, [], {}
    if url is None:
        from shared.domain.models import SMOLLM2
        from shared.platform.auth import local_token
        from shared.platform.config import Settings, bootstrap

        from services.serving.server import Server, ServingConfig

        state = Path(tempfile.mkdtemp(prefix="bench-eval-serve-"))
        adapters = bootstrap(Settings(state_dir=state))
        serving = bootstrap(adapters.settings, service="serving")
        opened = [serving, adapters]
        server = Server(serving, ServingConfig(base=SMOLLM2)).start()
        url, model, env = server.url + "/v1", SMOLLM2, {"BENCH_JUDGE_TOKEN": local_token(state)}
    try:
        spec = {"base_url": url, "model": model, "rubrics": ["refusal"], "timeout_s": 120}
        if env:
            spec["api_key_env"] = "BENCH_JUDGE_TOKEN"
        run = _evaluate(ROOT, ROOT / RECIPE, case, sets=(f"eval.judge={json.dumps(spec)}",), env=env)
    finally:
        if server is not None:
            server.stop()
        for resource in opened:
            resource.close()
    entry = run["result"]["judge"]
    return {"model": model, "served_here": server is not None, "suites": entry.get("suites", {}),
            "refusal_agreement": entry.get("agreement", {}).get("refusal", {}), "wall": round(run["wall"], 1)}


# ------------------------------------------------------------------------------------ main


def _demo_case(state: Path) -> list[str]:
    bucket = next(p for p in (state / "buckets").iterdir() if p.is_dir())
    versions = sorted((bucket / "models" / "support-assistant").iterdir(), key=lambda p: [int(x) for x in p.name.split(".")])
    data = next((bucket / "datasets").iterdir())
    return ["demo", str(data), str(versions[-1] / "adapter"), str(bucket / "probes" / "support-facts.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=4, action="append", default=[], metavar=("NAME", "DATA", "ADAPTER", "PROBES"))
    parser.add_argument("--demo-state", type=Path)
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--only", nargs="+", choices=["decisions", "timing", "resample", "judge"])
    parser.add_argument("--judge-url", help="an OpenAI-compatible endpoint (default: ftpipe serve here, SmolLM2-135M)")
    parser.add_argument("--judge-model")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    cases = ([_demo_case(args.demo_state)] if args.demo_state else []) + args.case
    if not cases:
        parser.error("name at least one --case (or --demo-state)")
    only = set(args.only or ["decisions", "timing", "resample", "judge"])
    old_tree = _old_tree(args.old_ref)
    old_recipe = Path(tempfile.mkdtemp(prefix="bench-eval-")) / "old-recipe.yaml"
    old_recipe.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old_ref}:{RECIPE}"], check=True,
                                         capture_output=True, text=True).stdout)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["meta"] = {"date": date.today().isoformat(), "old_ref": args.old_ref, "cores": os.cpu_count(),
                       "repeats": args.repeats, "draws": args.draws}
    for name, data, adapter, probes in cases:
        case = {"data": data, "adapter": adapter, "probes": probes}
        entry = results.setdefault("cases", {}).setdefault(name, {})
        if only & {"decisions", "resample"}:
            print(f"{name}: evaluating with the old code and with this tree", flush=True)
            old, new = _evaluate(old_tree, old_recipe, case), _evaluate(ROOT, ROOT / RECIPE, case)
            if "decisions" in only:
                entry["decisions"] = decisions(old, new)
            if "resample" in only:
                entry["resample"] = resample(old, new, args.draws)
        if "timing" in only and name == cases[0][0]:
            entry["timing"] = timing(old_tree, old_recipe, case, args.repeats)
        if "judge" in only and name == cases[0][0]:
            entry["judge"] = judge(case, args.judge_url, args.judge_model)
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1)[:6000])


if __name__ == "__main__":
    main()
