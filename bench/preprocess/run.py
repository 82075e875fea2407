"""The preprocess benchmark: whole-stage throughput, near-dup and PII quality against datasketch and
Presidio, on one generated corpus (bench/preprocess/corpus.py), in one run, side by side.

    HF_HUB_OFFLINE=1 /tmp/benchvenv/bin/python bench/preprocess/run.py \
        [--docs 200000] [--presidio-docs N] [--sweep-docs 40000] [--out results.json]

1. Whole stage: `services.preprocess.job.prepare` on the corpus with recipes/support-assistant.yaml
   (token counting included); documents/second = input rows / total seconds, per-stage timings from
   the result. `data.pii_residual_threshold` is raised to 1.0 so that the stage always runs to the
   end (the residual rate is still measured and judged against its target here).
2. Near-dup: `neardup.near_dedup` called on the exact-deduplicated rows as job.py builds them
   (the same rows the stage sees), scored against the corpus truth; datasketch MinHashLSH on the
   same rows, same shingles (neardup.words), num_perm / bands / rows, and the same estimated
   Jaccard >= threshold check on its candidates, then connected components. Then a sweep of
   shingle_words x bands x rows for ftpipe's stage on the first --sweep-docs rows.
3. PII: ftpipe's `rules` detector and Presidio (blank spaCy pipeline saved to disk + its AU
   recognizers, built by services.preprocess.pii.presidio_engine), each message scored against the
   recorded spans; documents/second of each, single process, same documents.
4. Residual: the stage manifest's residual rate, and the true leak rate of its output (output rows
   that still contain a known PII value of their source row).

Matching definitions are in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import date
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as corpus_mod  # noqa: E402

from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402

from services.preprocess import formats, neardup, partitions, pii  # noqa: E402

CHECKSUMMED = ("card", "iban", "tfn", "abn", "medicare", "ssn")
SWEEP_SHINGLES = (2, 3, 5)
SWEEP_BANDS = ((14, 8), (28, 4), (16, 7), (56, 2))
TARGETS = {"checksummed_recall": 0.99, "overall_recall": 0.95, "residual_rate": 0.001, "neardup_f1": 0.95,
           "throughput_ratio": 2.0}


# ------------------------------------------------------------------------------ near-dup scoring


def score_removals(kept: set[int], rows: set[int], cluster: dict[int, int]) -> dict:
    """Row-level precision / recall of near-dup removal. Of each true cluster's n rows present in
    `rows` (after exact dedup), n-1 should go: a removed row is a true positive while its cluster
    still has more rows removed-but-due; any further removal (a whole cluster removed, or a row
    with no near duplicate) is a false positive."""
    members: dict[int, list[int]] = defaultdict(list)
    for line in rows:
        members[cluster[line]].append(line)
    tp = fp = due = 0
    for lines in members.values():
        removed = sum(1 for line in lines if line not in kept)
        should = len(lines) - 1
        due += should
        tp += min(removed, should)
        fp += max(0, removed - should)
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / due if due else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"removed": tp + fp, "should_remove": due, "true_positives": tp, "false_positives": fp,
            "precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4)}


def deduped_rdd(spark, path: str, recipe):
    """(hash, (line, messages)) after validation and exact dedup, as job.prepare builds it."""
    rules = formats.RowRules(format=recipe.data.format, system_prompt=recipe.data.system_prompt,
                             max_row_bytes=recipe.data.max_row_bytes)
    validated = spark.sparkContext.textFile(path).zipWithIndex().mapPartitions(
        partial(formats.validate_jsonl, rules=rules))
    return validated.filter(lambda r: r[0] == "ok").map(partitions.dedup_key).reduceByKey(partitions.keep_representative)


def ftpipe_neardup(spark, rdd, params: neardup.Params) -> tuple[set[int], dict, float]:
    t0 = time.perf_counter()
    kept, res = neardup.near_dedup(spark, rdd, params)
    kept_lines = set(kept.map(lambda r: r[1][0] - 1).collect())  # the stage's line numbers are 1-based
    return kept_lines, res.report(), time.perf_counter() - t0


def datasketch_neardup(texts: dict[int, str], params: neardup.Params) -> tuple[set[int], set[int], float]:
    """(kept lines with the Jaccard check, kept lines on raw LSH candidates, seconds) with datasketch
    MinHashLSH; components by union-find, lowest line kept, as ftpipe does."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    k = params.shingle_words
    lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, params=(params.bands, params.rows))
    sigs = {}
    for line, text in texts.items():
        ws = neardup.words(text)
        grams = {" ".join(ws[i:i + k]) for i in range(max(1, len(ws) - k + 1))}
        m = MinHash(num_perm=params.num_perm, seed=1)
        m.update_batch([g.encode() for g in grams])
        sigs[line] = m
        lsh.insert(line, m, check_duplication=False)
    verified, raw = {}, {}

    def find(parent, x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for line in texts:
        m = sigs[line]
        for other in lsh.query(m):
            if other <= line:
                continue
            same = np.mean(m.hashvalues == sigs[other].hashvalues) >= params.threshold
            for parent, ok in ((raw, True), (verified, same)):
                if ok:
                    a, b = find(parent, line), find(parent, other)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    kept_v = {line for line in texts if find(verified, line) == line}
    kept_r = {line for line in texts if find(raw, line) == line}
    return kept_v, kept_r, time.perf_counter() - t0


# ------------------------------------------------------------------------------ PII scoring


class PiiScore:
    """Per-category counts for one detector. A true value is *recalled* when one predicted span of
    its category covers it entirely; *leaked* when any of its characters is outside every
    predicted span (whatever their category). A predicted span is *correct* when it overlaps a true
    value of its category; otherwise a false positive (classified by what it overlapped)."""

    def __init__(self):
        self.truth = Counter()
        self.recalled = Counter()
        self.leaked = Counter()
        self.predicted = Counter()
        self.correct = Counter()
        self.missed_shapes = Counter()   # (category, shape) of values not recalled
        self.fp_kinds = Counter()        # (category, what the false positive overlapped)
        self.seconds = 0.0
        self.docs = 0

    def add(self, text: str, spans: list, truth: list, distractors: list) -> None:
        for s, e, cat, shape in truth:
            self.truth[cat] += 1
            if any(ps <= s and pe >= e and pc == cat for ps, pe, pc in spans):
                self.recalled[cat] += 1
            else:
                self.missed_shapes[(cat, shape)] += 1
            covered = set()
            for ps, pe, _ in spans:
                covered.update(range(max(ps, s), min(pe, e)))
            if any(i not in covered for i in range(s, e) if not text[i].isspace()):
                self.leaked[cat] += 1
        for ps, pe, pc in spans:
            self.predicted[pc] += 1
            if any(ps < e and pe > s and cat == pc for s, e, cat, _ in truth):
                self.correct[pc] += 1
                continue
            other = [cat for s, e, cat, _ in truth if ps < e and pe > s]
            dis = [shape for s, e, shape in distractors if ps < e and pe > s]
            kind = (f"overlaps true {other[0]}" if other else f"distractor: {dis[0]}" if dis
                    else "template text")
            self.fp_kinds[(pc, kind)] += 1

    def table(self) -> dict:
        out = {}
        groups = {c: (c,) for c in pii.CATEGORIES}
        groups["checksummed"] = CHECKSUMMED
        groups["overall"] = pii.CATEGORIES
        groups["overall_without_person"] = tuple(c for c in pii.CATEGORIES if c != "person")
        for name, cats in groups.items():
            n, rec = sum(self.truth[c] for c in cats), sum(self.recalled[c] for c in cats)
            pred, cor = sum(self.predicted[c] for c in cats), sum(self.correct[c] for c in cats)
            out[name] = {"values": n, "recall": round(rec / n, 4) if n else None,
                         "precision": round(cor / pred, 4) if pred else None, "predicted": pred,
                         "leaked": sum(self.leaked[c] for c in cats)}
        return out

    def report(self) -> dict:
        return {"docs": self.docs, "seconds": round(self.seconds, 2),
                "docs_per_s": round(self.docs / self.seconds, 1) if self.seconds else None,
                "by_category": self.table(),
                "missed_shapes": {f"{c}: {s}": n for (c, s), n in self.missed_shapes.most_common(40)},
                "false_positive_kinds": {f"{c}: {k}": n for (c, k), n in self.fp_kinds.most_common(25)}}


def score_pii(detect, docs: list[tuple[dict, dict]]) -> dict:
    """Run `detect(text) -> spans` on every message of `docs` ((row, truth) pairs), resolve the
    spans as the stage does, score them; only the detection is timed."""
    score = PiiScore()
    for row, truth in docs:
        for mi, msg in enumerate(row["messages"]):
            text = msg["content"]
            t0 = time.perf_counter()
            spans = pii.resolve(detect(text))
            score.seconds += time.perf_counter() - t0
            score.add(text, spans, [(s, e, c, sh) for m, s, e, c, sh in truth["pii"] if m == mi],
                      [(s, e, sh) for m, s, e, sh in truth["distractors"] if m == mi])
        score.docs += 1
    return score.report()


# ------------------------------------------------------------------------------ residual


def true_leak_rate(out_dir: Path, id_to_line: dict[str, int], rows: list[dict], truths: list[dict]) -> dict:
    """Output rows (train/val/test) that still contain, case-insensitively, a PII value recorded
    for their source row (an exact copy is checked against its original's values)."""
    docs = leaked = 0
    by_cat = Counter()
    for name in ("train", "val", "test"):
        for line in open(out_dir / f"{name}.jsonl", encoding="utf-8"):
            row = json.loads(line)
            src = id_to_line.get(row["id"])
            if src is None:
                continue
            truth = truths[src]
            ref = truths[truth["cluster"]] if truth["kind"] == "exact" else truth
            source = rows[ref["line"]]["messages"]
            text = "\n".join(m["content"] for m in row["messages"]).casefold()
            cats = {c for mi, s, e, c, _ in ref["pii"]
                    if re.search(r"(?<!\w)" + re.escape(source[mi]["content"][s:e].casefold()) + r"(?!\w)", text)}
            docs += 1
            if cats:
                leaked += 1
                by_cat.update(cats)
    return {"documents": docs, "documents_leaking": leaked, "rate": round(leaked / docs, 6) if docs else None,
            "by_category": dict(by_cat.most_common())}


# ------------------------------------------------------------------------------ main


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_tables(res: dict) -> None:
    st, nd, pi = res["stage"], res["neardup"], res["pii"]
    print("\n== Preprocess bench", res["date"], f"({res['docs']} docs, {os.cpu_count()} cores) ==")
    print(f"{'metric':46} {'ftpipe':>12} {'reference':>12} {'target':>10}  ok")
    for name, ours, ref, target, ok in res["targets"]:
        print(f"{name:46} {ours:>12} {ref:>12} {target:>10}  {ok}")
    print("\nwhole stage timings (s):", json.dumps(st["timings"]))
    print(f"\nnear-dup ({nd['params']}):")
    for who in ("ftpipe", "datasketch", "datasketch_candidates_only"):
        r = nd[who]
        print(f"  {who:28} P {r['precision']:.4f}  R {r['recall']:.4f}  F1 {r['f1']:.4f}  "
              f"removed {r['removed']} / should {r['should_remove']}  ({r.get('seconds', 0):.1f} s)")
    if res.get("sweep"):
        print(f"\nnear-dup sweep on {res['sweep']['docs']} docs (threshold 0.7):")
        for row in res["sweep"]["rows"]:
            print(f"  shingle {row['shingle_words']}  {row['bands']:>2} x {row['rows']}  P {row['precision']:.4f}  "
                  f"R {row['recall']:.4f}  F1 {row['f1']:.4f}  {row['seconds']:.1f} s")
    print(f"\nPII per category on {pi['rules']['docs']} docs (recall / precision / leaked values):")
    print(f"  {'category':12} {'values':>7}  {'rules R':>8} {'rules P':>8} {'leak':>6}  {'presidio R':>10} "
          f"{'presidio P':>10} {'leak':>6}")
    pres = pi.get("presidio", {}).get("by_category", {})
    for cat, r in pi["rules"]["by_category"].items():
        p = pres.get(cat, {})
        print(f"  {cat:12} {r['values']:>7}  {pct(r['recall']):>8} {pct(r['precision']):>8} {r['leaked']:>6}  "
              f"{pct(p.get('recall')):>10} {pct(p.get('precision')):>10} {p.get('leaked', '-'):>6}")
    print("\nrules: values missed, by shape:", json.dumps(pi["rules"]["missed_shapes"], indent=1))
    print("rules: false positives, by kind:", json.dumps(pi["rules"]["false_positive_kinds"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--presidio-docs", type=int, default=0,
                    help="score PII (both detectors) on this many documents, a deterministic every-k-th "
                         "subsample of the scorable rows (0: all)")
    ap.add_argument("--sweep-docs", type=int, default=40_000,
                    help="about this many rows (whole clusters) for the dedup sweep (0: no sweep)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ftpipe-bench-preprocess")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # offline: it falls back to its snapshot
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    started = time.perf_counter()
    res: dict = {"date": date.today().isoformat(), "docs": args.docs, "cores": os.cpu_count(), "seed": args.seed}

    # --- corpus
    t0 = time.perf_counter()
    corpus_path, truth_path = corpus_mod.generate(args.docs, args.work, args.seed)
    rows = [json.loads(line) for line in open(corpus_path, encoding="utf-8")]
    truths = [json.loads(line) for line in open(truth_path, encoding="utf-8")]
    res["corpus"] = {"seconds": round(time.perf_counter() - t0, 1), "kinds": dict(Counter(t["kind"] for t in truths)),
                     "pii_values": dict(Counter(s[3] for t in truths if t["kind"] != "exact" for s in t["pii"])),
                     "near_copies_true_jaccard_below_0.7": sum(1 for t in truths if t.get("jaccard", 1) < 0.7)}
    print("corpus:", json.dumps(res["corpus"]), flush=True)

    # --- whole stage
    from services.preprocess.job import prepare
    from services.preprocess.spark import build_session

    recipe = apply_overrides(load_recipe("support-assistant"), {"data.pii_residual_threshold": 1.0})
    spark = build_session(cores=2, driver_memory=args.driver_memory)
    out_dir = args.work / "prepared"
    t0 = time.perf_counter()
    result = prepare(spark, str(corpus_path), recipe, out_dir, source={})
    wall = time.perf_counter() - t0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    res["stage"] = {"rejected": result.rejected, "reason": result.reason, "seconds": round(wall, 1),
                    "docs_per_s": round(args.docs / wall, 1), "counts": result.counts, "timings": result.timings,
                    "near_dedup": manifest.get("near_dedup"), "pii": manifest.get("pii"),
                    "quality": manifest.get("quality"), "tokens_total": (manifest.get("tokens") or {}).get("total")}
    print(f"stage: {wall:.1f} s, {args.docs / wall:.0f} docs/s, counts {result.counts}", flush=True)

    # --- near-dup: ftpipe vs datasketch, same rows, same parameters
    params = neardup.Params.from_spec(recipe.dedup)
    rdd = deduped_rdd(spark, str(corpus_path), recipe).cache()
    # (row id, 0-based line, compared text); the stage's line numbers are 1-based, the truth's 0-based
    dedup_rows = rdd.map(lambda r: (r[0][:partitions.ID_CHARS], r[1][0] - 1,
                                    neardup.conversation_text(r[1][1]))).collect()
    id_to_line = {rid: line for rid, line, _ in dedup_rows}
    texts = {line: text for _, line, text in dedup_rows}
    cluster = {t["line"]: t["cluster"] for t in truths}
    kept, report, secs = ftpipe_neardup(spark, rdd, params)
    nd = {"params": f"shingle {params.shingle_words}, {params.bands} x {params.rows}, threshold {params.threshold}",
          "rows_after_exact_dedup": len(texts),
          "ftpipe": {**score_removals(kept, set(texts), cluster), "seconds": round(secs, 1), "report": report}}
    kept_v, kept_r, secs = datasketch_neardup(texts, params)
    nd["datasketch"] = {**score_removals(kept_v, set(texts), cluster), "seconds": round(secs, 1)}
    nd["datasketch_candidates_only"] = score_removals(kept_r, set(texts), cluster)
    # near copies caught (not left beside another kept row of their cluster), by true Jaccard with the original
    kept_per_cluster = Counter(cluster[line] for line in kept)
    buckets = defaultdict(lambda: [0, 0])
    for t in truths:
        if t["kind"] == "near" and t["line"] in texts:
            b = "<0.7" if t["jaccard"] < 0.7 else "0.7-0.8" if t["jaccard"] < 0.8 else ">=0.8"
            buckets[b][0] += 1
            buckets[b][1] += not (t["line"] in kept and kept_per_cluster[t["cluster"]] > 1)
    nd["ftpipe_near_copies_caught_by_true_jaccard"] = {b: f"{r}/{n}" for b, (n, r) in sorted(buckets.items())}
    res["neardup"] = nd
    rdd.unpersist()
    print("near-dup:", json.dumps({k: v for k, v in nd.items() if k != "ftpipe"}), flush=True)

    # --- sweep on a cluster-preserving subsample (every row of every k-th cluster, so that the
    # duplicate density is the full corpus's), ftpipe's stage only
    if args.sweep_docs:
        sub = args.work / "sweep.jsonl"
        k = max(1, round(args.docs / args.sweep_docs))
        picked = [t["line"] for t in truths if t["cluster"] % k == 0]
        with open(sub, "w", encoding="utf-8") as dst:
            for line in picked:
                dst.write(json.dumps(rows[line], ensure_ascii=False) + "\n")
        sub_line = dict(enumerate(picked))  # subsample line -> corpus line
        srdd = deduped_rdd(spark, str(sub), recipe).cache()
        slines = {sub_line[i] for i in srdd.map(lambda r: r[1][0] - 1).collect()}
        sweep = []
        for k in SWEEP_SHINGLES:
            for bands, nrows in SWEEP_BANDS:
                p = neardup.Params(shingle_words=k, num_perm=bands * nrows, bands=bands, rows=nrows, threshold=0.7)
                skept, _, secs = ftpipe_neardup(spark, srdd, p)
                skept = {sub_line[i] for i in skept}
                sweep.append({"shingle_words": k, "bands": bands, "rows": nrows, **score_removals(skept, slines, cluster),
                              "seconds": round(secs, 1)})
                print("sweep:", json.dumps(sweep[-1]), flush=True)
        srdd.unpersist()
        res["sweep"] = {"docs": len(picked), "rows": sweep}
    spark.stop()

    # --- PII: rules vs Presidio on the same documents
    scorable = [(rows[t["line"]], t) for t in truths if t["kind"] != "exact"]
    if args.presidio_docs and args.presidio_docs < len(scorable):
        step = len(scorable) / args.presidio_docs
        scorable = [scorable[int(i * step)] for i in range(args.presidio_docs)]
    rules = pii.backend("rules")
    res["pii"] = {"docs": len(scorable), "rules": score_pii(rules.detect, scorable)}
    print("rules:", json.dumps(res["pii"]["rules"]["by_category"]["overall"]),
          res["pii"]["rules"]["docs_per_s"], "docs/s", flush=True)
    model_dir = args.work / "spacy-blank-en"
    import spacy

    spacy.blank("en").to_disk(model_dir)
    presidio = pii.PresidioDetector(spacy_model=str(model_dir))
    res["pii"]["presidio"] = score_pii(presidio.detect, scorable)
    res["pii"]["presidio_setup"] = {"spacy_model": "spacy.blank('en') saved to disk",
                                    "extra_recognizers": list(pii.PRESIDIO_EXTRA_RECOGNIZERS),
                                    "entities": presidio.entities}
    print("presidio:", json.dumps(res["pii"]["presidio"]["by_category"]["overall"]),
          res["pii"]["presidio"]["docs_per_s"], "docs/s", flush=True)

    # --- residual
    residual = (manifest.get("pii") or {}).get("residual", {})
    res["residual"] = {"scanner_rate": residual.get("rate"), "scanner_hits_by_rule": residual.get("hits_by_rule"),
                       "documents_with_hits": residual.get("documents_with_hits"),
                       "true_leak": true_leak_rate(out_dir, id_to_line, rows, truths) if not result.rejected else None}

    # which look-alikes (not PII) the residual scan flags by itself: its hits per distractor shape
    from shared.domain import pii_residual

    dis_hits, dis_n = Counter(), Counter()
    for t in truths:
        if t["kind"] == "original":
            for mi, s, e, shape in t["distractors"]:
                dis_n[shape] += 1
                dis_hits[shape] += bool(pii_residual.scan(rows[t["line"]]["messages"][mi]["content"][s:e]))
    res["residual"]["scanner_hits_on_distractors"] = {sh: f"{dis_hits[sh]}/{dis_n[sh]}" for sh in sorted(dis_n)}

    # --- targets
    r_tab, p_tab = res["pii"]["rules"]["by_category"], res["pii"]["presidio"]["by_category"]
    stage_dps, pres_dps = res["stage"]["docs_per_s"], res["pii"]["presidio"]["docs_per_s"]
    rules_dps = res["pii"]["rules"]["docs_per_s"]
    ft, ds = nd["ftpipe"], nd["datasketch"]
    rate = res["residual"]["scanner_rate"]
    leak = (res["residual"]["true_leak"] or {}).get("rate")
    res["targets"] = [
        ("PII recall, checksummed ids (rules vs Presidio)", pct(r_tab["checksummed"]["recall"]),
         pct(p_tab["checksummed"]["recall"]), ">= 99%", mark(r_tab["checksummed"]["recall"] >= 0.99)),
        ("PII recall, overall", pct(r_tab["overall"]["recall"]), pct(p_tab["overall"]["recall"]), ">= 95%",
         mark(r_tab["overall"]["recall"] >= 0.95)),
        ("PII precision, overall", pct(r_tab["overall"]["precision"]), pct(p_tab["overall"]["precision"]), "-", ""),
        ("PII values leaked (any char unmasked)", str(r_tab["overall"]["leaked"]), str(p_tab["overall"]["leaked"]),
         "-", ""),
        ("residual rate (stage's residual scan)", pct(rate), "-", "< 0.1%", mark(rate is not None and rate < 0.001)),
        ("output docs leaking a known value", pct(leak), "-", "-", ""),
        ("near-dup precision (vs datasketch)", f"{ft['precision']:.4f}", f"{ds['precision']:.4f}", "-", ""),
        ("near-dup recall", f"{ft['recall']:.4f}", f"{ds['recall']:.4f}", "-", ""),
        ("near-dup F1", f"{ft['f1']:.4f}", f"{ds['f1']:.4f}", ">= 0.95", mark(ft["f1"] >= 0.95)),
        ("whole stage docs/s vs Presidio docs/s", f"{stage_dps:.0f}", f"{pres_dps:.0f}", ">= 2x",
         mark(stage_dps >= 2 * pres_dps)),
        ("rules detector docs/s vs Presidio (1 process)", f"{rules_dps:.0f}", f"{pres_dps:.0f}", "-",
         f"{rules_dps / pres_dps:.1f}x"),
    ]
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(res, indent=2))
    print_tables(res)
    print(f"\ntotal {res['total_seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
