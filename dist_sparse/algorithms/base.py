"""What distinguishes one sparse-training method from another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodRule:
    name: str
    kind: Literal["fixed", "gmp", "regrow"]
    """fixed: the first mask stays; gmp: magnitude pruning of the active set on a schedule;
    regrow: drop the smallest-magnitude active weights and regrow as many elsewhere."""
    starts_dense: bool
    """Training begins with every weight active (GMP); else the first mask has the target density."""
    grow: Literal["none", "random", "gradient"] = "none"
    """Score of a candidate for regrowth: seeded uniform noise (SET) or |dense gradient| (RigL)."""
    available: bool = True
    note: str = ""
