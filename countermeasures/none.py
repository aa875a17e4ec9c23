"""The no-countermeasure column: train on the protected data as it is (DH Table I 'Vanilla' without the
standard augmentation being counted as a countermeasure)."""

from __future__ import annotations

from typing import ClassVar

from bench.api import COUNTERMEASURES, Countermeasure


@COUNTERMEASURES.register("none")
class NoCountermeasure(Countermeasure):
    """No countermeasure: the victim trains on the protected set with its recipe's standard augmentation."""

    paper: ClassVar[str] = "reference (no countermeasure)"
