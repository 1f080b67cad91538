"""The coordinator's routes, one router per domain (each included by app.api.app)."""
