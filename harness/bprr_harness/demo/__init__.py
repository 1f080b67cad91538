"""The live demo: ``bprr serve --demo SCENARIO``.

It runs the coordinator on a fresh SQLite file, one simulated server agent per server of the
scenario (``bprr_client.ServerAgent`` on threads, RTTs taken from the scenario, a simulated
span host that "loads" its assigned blocks after a short delay) and a Poisson stream of
simulated clients that book and release sessions through ``bprr_client.RouteClient``.

``bprr_harness.demo.stream`` (the client stream) needs nothing beyond the standard
library; ``bprr_harness.demo.swarm`` and ``bprr_harness.demo.runner`` need the client package
(``bprr-client``, a dependency of this distribution).
"""
