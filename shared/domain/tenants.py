"""Per-tenant quotas, shared by the CLI that sets them (`ftpipe tenants`) and the trainer that
enforces them (services/trainer/quota.py).

A quota lives in `tenants/{tenant}`: the most runs the tenant may have training at once, and the
GPU-hours and the USD (at the recipes' GPU prices) it may use per calendar month (UTC). A missing
document, or a missing limit, is unlimited; `ftpipe tenants set T --unlimited` says so explicitly.
"""
from __future__ import annotations

import re
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.domain.access import Caller, require
from shared.platform.ports import DocStore

TENANTS = "tenants"
DEFAULT_TENANT = "default"   # exists without a document: the local stack's, and old drops' incoming/<recipe>/
# Tenant names are document ids (Firestore forbids '/', '.', '..' and __reserved__ names).
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


class Quota(BaseModel):
    model_config = ConfigDict(extra="ignore")
    max_concurrent_jobs: int | None = Field(default=None, ge=0)                   # None: unlimited
    gpu_hours_per_month: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # None: unlimited
    cost_usd_per_month: float | None = Field(default=None, ge=0, allow_inf_nan=False)   # None: unlimited

    def describe(self) -> dict:
        return {"max_concurrent_jobs": self.max_concurrent_jobs, "gpu_hours_per_month": self.gpu_hours_per_month,
                "cost_usd_per_month": self.cost_usd_per_month}


class TenantError(ValueError):
    """A bad tenant name or quota document; the message says what to fix."""


def check_name(tenant: str) -> str:
    if not TENANT_NAME.match(tenant):
        raise TenantError(f"tenant {tenant!r}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit")
    return tenant


def get_quota(docs: DocStore, tenant: str) -> Quota:
    """The tenant's quota; unlimited when it has none."""
    doc = docs.get(TENANTS, check_name(tenant))
    try:
        return Quota.model_validate(doc or {})
    except ValidationError as exc:
        raise TenantError(f"{TENANTS}/{tenant} is not a valid quota: {exc.errors()[0]['loc']}: "
                          f"{exc.errors()[0]['msg']}; fix it with `ftpipe tenants set {tenant} ...`") from exc


def set_quota(docs: DocStore, caller: Caller, tenant: str, **limits) -> Quota:
    """Change the given limits (None: unlimited) and keep the others: an admin's (shared/domain/access.py),
    recorded as `updated_by`. Setting a quota is how a tenant comes to exist."""
    require(caller, "admin", to=f"set tenant {tenant}'s quota")
    current = get_quota(docs, tenant)
    try:
        updated = Quota.model_validate({**current.describe(), **limits})
    except ValidationError as exc:
        raise TenantError(f"quota for {tenant!r}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from exc
    docs.set(TENANTS, tenant, {**updated.describe(), "updated_at": time.time(), "updated_by": caller.subject})
    return updated


def list_quotas(docs: DocStore) -> list[tuple[str, Quota]]:
    return [(tenant, Quota.model_validate(doc)) for tenant, doc in docs.query(TENANTS)]
