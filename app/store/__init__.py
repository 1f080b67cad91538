"""SQL state of the coordinator: typed SQLAlchemy models, engine set-up, repositories."""
