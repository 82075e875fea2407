"""Test helpers for the trust boundary (shared/domain/access.py, model_policy.py): the stack's admin,
named tokens, and model names claimed as a submission by an admin would claim them."""
from shared.domain import access, model_policy
from shared.domain.access import Caller
from shared.domain.recipe import Recipe

ADMIN = Caller(subject="token:stack", admin=True)


def own(docs, recipe: Recipe, tenant: str = "default") -> None:
    """`recipe.model_name` claimed for `tenant` with the recipe's own settings, as an admin's first
    submission of it does (shared/domain/jobs.py authorize_job)."""
    model_policy.claim(docs, ADMIN, recipe.model_name, tenant, recipe)


def token(docs, name: str, role: str, tenant: str | None = "default") -> str:
    """A new named token's secret."""
    return access.create_token(docs, ADMIN, name, role, None if role == "admin" else tenant)
