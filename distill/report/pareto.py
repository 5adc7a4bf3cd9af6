"""The Pareto frontier of (accuracy, cost) points: the runs no other run beats on both."""

from __future__ import annotations


def pareto_front(points: list[tuple[float, float] | None]) -> list[bool]:
    """For (accuracy, cost) points: True where no other point has accuracy >= and cost <=, with one
    of the two strict. ``None`` (not measured) is never on the front."""
    def dominated(p: tuple[float, float]) -> bool:
        return any(q is not None and q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in points)

    return [p is not None and not dominated(p) for p in points]
