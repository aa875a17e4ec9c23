"""Step 1 of the flow: matrices, their expansion into cells, recipes, cache keys and capability checks, cost estimates."""
