"""bprr's harness: the live demo (``bprr serve --demo``) and the testbed (``bprr testbed``).

A distribution of its own (``harness/pyproject.toml``), beside the coordinator (``bprr``) and
the client package (``bprr-client``), both of which it uses. The coordinator never imports it
at import time: it finds the harness through the entry points the harness registers
(``bprr.commands``: ``bprr testbed``; ``bprr.demo``: ``bprr serve --demo``), see
``app.plugins``.
"""
