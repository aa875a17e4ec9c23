"""Units of component parameters, declared as dataclass field metadata.

bench counts the L∞ budgets and step sizes of protections in 1/255 pixel steps (``epsilon = 8`` is 8/255 of the
pixel range), where torchattacks and much of the papers' code write 8/255 ≈ 0.031. A field declared with
``pixel_steps`` carries that unit: ``bench list`` and ``bench show`` print it, and a matrix that gives a budget
0 < ε < 1 gets a warning, since such a budget moves almost no pixel of an 8-bit image.

Example::

    from bench.api import PROTECTIONS, Protection, pixel_steps

    @PROTECTIONS.register("mine")
    class Mine(Protection):
        epsilon: float = pixel_steps(8.0)                  # an L∞ budget: warned about below 1
        step_size: float = pixel_steps(0.8, budget=False)  # a step size: below 1 is usual
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

PIXEL_STEPS = "1/255"


def pixel_steps(default: float, *, budget: bool = True) -> float:
    """A parameter field counted in 1/255 pixel steps, with its ``default``.

    Args:
        default: the default value, in 1/255 steps (8.0 is 8/255).
        budget: whether the field is an L∞ budget (ε), so that 0 < value < 1 is suspect; False for step sizes.

    Returns:
        A ``dataclasses.field`` whose metadata is ``{"unit": "1/255", "budget": budget}``.
    """
    return dataclasses.field(default=default, metadata={"unit": PIXEL_STEPS, "budget": budget})


def units(component: Any) -> dict[str, str]:
    """Field name → unit, for the fields of a component (class or instance) that declare one."""
    return {f.name: f.metadata["unit"] for f in dataclasses.fields(component) if "unit" in f.metadata}


def small_budgets(component: Any) -> list[str]:
    """One message for each pixel-step budget of a component instance that is 0 < value < 1."""
    messages = []
    for f in dataclasses.fields(component):
        value = getattr(component, f.name)
        if f.metadata.get("unit") != PIXEL_STEPS or not f.metadata.get("budget"):
            continue
        if isinstance(value, (int, float)) and 0 < value < 1:
            steps = round(value * 255)
            hint = f"; did you mean {steps}?" if steps >= 1 else ""
            messages.append(f"bench counts ε in 1/255 steps: {f.name} = {value:g} gives almost no "
                            f"perturbation{hint}")
    return messages


def warn_small_budgets(component: Any, where: str) -> None:
    """Print ``small_budgets``' messages to stderr as ``bench: warning: key 'where': …`` (the run goes on)."""
    for message in small_budgets(component):
        print(f"bench: warning: key {where!r}: {message}", file=sys.stderr)
