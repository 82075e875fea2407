"""The DocStore port's contract, the same for every adapter."""
import threading


def test_get_set_merge_delete(docs, name):
    assert docs.get(name, "d") is None
    docs.set(name, "d", {"a": 1, "m": {"x": 1, "y": 2}})
    docs.merge(name, "d", {"b": 2, "m": {"y": 3, "z": 4}})
    assert docs.get(name, "d") == {"a": 1, "b": 2, "m": {"x": 1, "y": 3, "z": 4}}
    docs.set(name, "d", {"only": True})
    assert docs.get(name, "d") == {"only": True}
    docs.delete(name, "d")
    assert docs.get(name, "d") is None


def test_create_only_once(docs, name):
    assert docs.create(name, "k", {"v": 1}) is True
    assert docs.create(name, "k", {"v": 2}) is False
    assert docs.get(name, "k") == {"v": 1}


def test_transactions_serialise_concurrent_increments(docs, name):
    docs.set(name, "counter", {"n": 0})

    def bump(txn):
        doc = txn.get(name, "counter")
        txn.set(name, "counter", {"n": doc["n"] + 1})

    def worker():
        for _ in range(5):
            docs.transaction(bump)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert docs.get(name, "counter") == {"n": 20}


def test_transaction_rolls_back_on_error(docs, name):
    docs.set(name, "x", {"v": 1})

    def fail(txn):
        txn.get(name, "x")
        txn.set(name, "x", {"v": 2})
        raise RuntimeError("boom")

    try:
        docs.transaction(fail)
    except RuntimeError:
        pass
    assert docs.get(name, "x") == {"v": 1}


def test_query_where_order_limit(docs, name):
    rows = [("r1", "sft", 0.9, "succeeded"), ("r2", "sft", 0.5, "failed"), ("r3", "sft", 0.7, "succeeded"),
            ("r4", "dpo", 0.1, "succeeded")]
    for doc_id, recipe, loss, status in rows:
        docs.set(name, doc_id, {"recipe": recipe, "metrics": {"val_loss": loss}, "status": status})
    docs.set(name, "r5", {"recipe": "sft", "status": "running"})  # no metrics: left out when ordering by them
    best = docs.query(name, where=[("recipe", "==", "sft")], order_by=[("metrics.val_loss", "asc")], limit=2)
    assert [doc_id for doc_id, _ in best] == ["r2", "r3"]
    assert [d for d, _ in docs.query(name, where=[("status", "in", ["failed", "running"])])] == ["r2", "r5"]
    assert [d for d, _ in docs.query(name, where=[("metrics.val_loss", ">", 0.6)], order_by=[("metrics.val_loss", "desc")])] == ["r1", "r3"]
    assert docs.query(name, where=[("recipe", "==", "nope")]) == []
