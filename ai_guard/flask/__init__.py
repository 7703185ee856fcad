"""The Flask extension: ``from ai_guard.flask import AIGuard``.

::

    from flask import Flask
    from ai_guard.flask import AIGuard

    app = Flask(__name__)
    app.config["AI_GUARD_STORE_URL"] = "redis://127.0.0.1:6379/0"
    guard = AIGuard(app)            # or AIGuard().init_app(app) in an app factory

    @app.post("/answers")
    @guard.idempotent()
    def answer(): ...

The blueprint serves ``/ai-guard/metrics``, ``/ai-guard/metrics/prometheus``,
``/ai-guard/slo``, ``/ai-guard/health`` and the dashboard at ``/ai-guard/``. See
:mod:`ai_guard.flask._extension` for the settings and :mod:`ai_guard.flask._blueprint` for
the routes and their protection.
"""

from __future__ import annotations

from ai_guard.flask._extension import (
    AIGuard,
    AIGuardSettings,
    AIGuardState,
    current_state,
    load_settings,
)

__all__ = ["AIGuard", "AIGuardSettings", "AIGuardState", "current_state", "load_settings"]
