"""A node of a circuit: one feature, or the error, of one traced SAE at one position."""

from __future__ import annotations

from dataclasses import dataclass

from sae_mcp.engine.attribution_checks import ERROR


@dataclass(frozen=True)
class Node:
    sae: int  # index into plan.saes
    position: int
    feature: int  # ERROR for the error node
    attribution: float

    def node_id(self, keys: list[str]) -> str:
        what = "error" if self.feature == ERROR else str(self.feature)
        return f"{keys[self.sae]}/{what}@{self.position}"
