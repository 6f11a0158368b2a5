"""The Celery app: `celery -A tasks worker|beat|flower` finds `app` here.

Tasks are thin adapters over functions in `jobs/`; they take ids, never inputs or secrets,
because Flower shows every task's arguments.
"""

from __future__ import annotations

from tasks import jobs as _jobs  # noqa: F401  (registers the tasks on the app)
from tasks.app import app

__all__ = ["app"]
