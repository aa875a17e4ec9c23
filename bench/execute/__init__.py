"""Step 2: running the planned stages (protect → purify → train) on a backend, under claims."""
