"""Every adapter satisfies its port (shared/platform/ports.py): pyright checks the assignments below
in `make lint`, so an adapter that drifts from its Protocol fails before any test runs. Nothing
here runs (the Google clients are not imported)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.platform.adapters.firestore import FirestoreDocStore, _Txn
    from shared.platform.adapters.gcs import GcsObjectStore
    from shared.platform.adapters.local_store import LocalObjectStore
    from shared.platform.adapters.pubsub import PubSubBus, PubSubMessage, PubSubSubscription
    from shared.platform.adapters.sqlite_bus import LocalMessage, SqliteBus, StreamingPull
    from shared.platform.adapters.sqlite_docs import SqliteDocStore, _SqliteTxn
    from shared.platform.ports import Bus, DocStore, Message, ObjectStore, Subscription, Transaction

    def _every_adapter_is_its_port(
        sqlite_bus: SqliteBus, pubsub_bus: PubSubBus, local_store: LocalObjectStore, gcs_store: GcsObjectStore,
        sqlite_docs: SqliteDocStore, firestore_docs: FirestoreDocStore, local_message: LocalMessage,
        pubsub_message: PubSubMessage, streaming_pull: StreamingPull, pubsub_subscription: PubSubSubscription,
        sqlite_txn: _SqliteTxn, firestore_txn: _Txn,
    ) -> None:
        buses: list[Bus] = [sqlite_bus, pubsub_bus]
        stores: list[ObjectStore] = [local_store, gcs_store]
        docs: list[DocStore] = [sqlite_docs, firestore_docs]
        messages: list[Message] = [local_message, pubsub_message]
        subscriptions: list[Subscription] = [streaming_pull, pubsub_subscription]
        transactions: list[Transaction] = [sqlite_txn, firestore_txn]
        del buses, stores, docs, messages, subscriptions, transactions
