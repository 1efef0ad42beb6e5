"""The operator's console at /console (CONSOLE_ENABLED): pages over the queue, behind the
admin key. Routes in pages.py, sign-in and CSRF in _auth.py, rendering in _render.py; its
reads of Redis are core/redis/console.py's."""

from .pages import console_routes

__all__ = ["console_routes"]
