"""bench: protections × countermeasures × victims grids for unlearnable-example research."""

__version__ = "0.1.0"
