"""A run's ledger and its finish line (``handrail runs``, ``GET /runs/{id}``)."""
