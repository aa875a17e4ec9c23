"""Protections: every non-underscore module here is imported and registers its protections."""
