"""The coordinator's service layer: one transaction per request, on top of app.store."""
