"""Countermeasures: every non-underscore module here is imported and registers its countermeasures."""
