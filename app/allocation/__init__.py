"""The pure allocation domain: scenarios, the performance model and the solvers."""
