"""Entrypoint of the tracker (Cloud Run): the lineage writer plus the API and dashboard on its port
($PORT; locally a free one, advertised in <state>/services/tracker.json), its /api routes behind
the authenticator of shared/platform/auth.py (locally named tokens and the stack's own in <state>/auth-token,
created here if absent; IAP in the cloud) and the roles of shared/domain/access.py."""
from shared.platform.auth import authenticator
from shared.platform.main import serve

from services.tracker.api import create_app
from services.tracker.service import SERVICE


def api(adapters):
    settings = adapters.settings
    return create_app(adapters, authenticator(settings, adapters.docs, audience=settings.dashboard_audience, iap=True))


if __name__ == "__main__":
    serve(SERVICE, http_app=api)
