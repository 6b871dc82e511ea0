r"""RID's multi-level schedule: which phase each epoch (or step) of training is in.

Training is split into ``n_rounds`` rounds; each round starts with filter-phase positions and
ends with student-phase positions, and ``filter_fraction`` of all positions are filter positions.
Positions count epochs or optimizer steps (``unit``). Two placements say where the filter
positions go when the total ``T`` is not a multiple of the rounds ``R`` (with
:math:`f` = ``filter_fraction``):

* ``"even"`` (the default) — round :math:`k` spans positions
  :math:`[\lceil kT/R\rceil, \lceil (k+1)T/R\rceil)` (lengths differ by one at most). The
  schedule holds :math:`F = \lfloor fT + \tfrac12\rfloor` filter positions in all (the whole number
  nearest to :math:`fT`, halves up), shared out by cumulative rounding: round :math:`k` opens with
  :math:`\lfloor f b_{k+1} + \tfrac12\rfloor - \lfloor f b_k + \tfrac12\rfloor` of them, where
  :math:`b_k = \lceil kT/R\rceil`. The filter share is :math:`f` up to one position in ``T``, at
  every length.
* ``"paper"`` — the official code's: rounds of :math:`L = \lfloor T/R\rfloor` positions, each
  opening with the :math:`\lceil fL\rceil` positions :math:`p` with :math:`p \bmod L < fL`; the
  :math:`T - RL` positions left over form one more, short round (index ``R``) that again opens
  with up to :math:`\lceil fL\rceil` filter positions. Rounding up in every round and the extra
  round make the filter share exceed :math:`f`: 28 of 100 epochs for :math:`(R, f) = (3, 1/4)`,
  24 of 60 for :math:`(7, 0.3)`, where ``"even"`` gives 25 and 18.

A schedule that cannot give every one of its ``n_rounds`` rounds a filter position and a student
position (fewer positions than rounds, rounds too short, a filter share too small to reach every
round) raises a ``ValueError`` that says how many positions, or how few rounds, would do. (With
``filter_fraction=0`` there are no filter positions and only the student positions are required.)
The paper's extra round is exempt, as in its code: it may hold filter positions only.

"Equal student steps": :meth:`RIDSchedule.total_for_student` is the shortest total whose student
positions are exactly a given number — the filter phases come on top of the student's training.

    >>> schedule = RIDSchedule(n_rounds=5, filter_fraction=0.2)
    >>> schedule.total_for_student(100)
    125
    >>> "".join(schedule.phase(p, 25)[0].upper() for p in range(25))
    'FSSSSFSSSSFSSSSFSSSSFSSSS'
    >>> schedule.filter_positions(23), RIDSchedule(3, 0.25, placement="paper").filter_positions(100)
    (5, 28)
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

from rid_fast.distill._checks import check_int, check_number

__all__ = ["RIDSchedule", "Round", "PLACEMENTS"]

#: Values of ``RIDSchedule(placement=...)``.
PLACEMENTS = ("even", "paper")


class Round(NamedTuple):
    """One round of a schedule: its first position, its length and how many of its first
    positions are filter positions."""

    start: int
    length: int
    filter: int


def _nearest(x: float) -> int:
    """The whole number nearest to ``x`` (halves up)."""
    return math.floor(x + 0.5)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


@dataclass(frozen=True)
class RIDSchedule:
    """The paper's multi-level schedule (see the module notes for where filter positions go).

    Args:
        n_rounds: rounds of filter then student positions (the paper: 5).
        filter_fraction: share of all positions in the filter phase, in [0, 1) (the paper: 0.2).
        unit: ``"epoch"`` or ``"step"``: what a position counts.
        redundancy_from_round: first round whose filter phase includes the redundancy term
            (the paper: the second round, 1).
        placement: ``"even"`` (filter share ``filter_fraction`` at every length) or ``"paper"``
            (the official code's rounding).

    >>> schedule = RIDSchedule(n_rounds=5, filter_fraction=0.2)
    >>> [schedule.phase(epoch, total=50) for epoch in range(3)]
    ['filter', 'filter', 'student']
    """

    n_rounds: int = 5
    filter_fraction: float = 0.2
    unit: str = "epoch"
    redundancy_from_round: int = 1
    placement: str = "even"

    def __post_init__(self) -> None:
        check_int("schedule.n_rounds", self.n_rounds, 1)
        check_number("schedule.filter_fraction", self.filter_fraction, minimum=0.0)
        if self.filter_fraction >= 1.0:
            raise ValueError(f"schedule.filter_fraction must be in [0, 1); got {self.filter_fraction}")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"schedule.unit must be 'epoch' or 'step'; got {self.unit!r}")
        check_int("schedule.redundancy_from_round", self.redundancy_from_round, 0)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"schedule.placement must be one of {PLACEMENTS}; got {self.placement!r}")

    # ---- counts (closed forms, no validation) --------------------------------------------------

    def filter_positions(self, total: int) -> int:
        """Filter positions in a schedule of ``total`` positions."""
        if self.placement == "even":
            return _nearest(self.filter_fraction * total)
        length, left_over = divmod(total, self.n_rounds)
        per_round = self._paper_filter_per_round(length)
        return self.n_rounds * per_round + min(per_round, left_over)

    def student_positions(self, total: int) -> int:
        """Student positions in a schedule of ``total`` positions."""
        return total - self.filter_positions(total)

    def _paper_filter_per_round(self, length: int) -> int:
        # The official code's test ``position % length < fraction * length`` on floats.
        return math.ceil(self.filter_fraction * length)

    # ---- the layout ----------------------------------------------------------------------------

    def rounds(self, total: int) -> tuple[Round, ...]:
        """The rounds of a schedule of ``total`` positions; a ``ValueError`` if it cannot be honoured."""
        return _layout(self, total)

    def round_index(self, position: int, total: int) -> int:
        """The round that ``position`` (0-based) of ``total`` belongs to."""
        rounds = self._checked(position, total)
        return bisect.bisect_right([r.start for r in rounds], position) - 1

    def phase(self, position: int, total: int) -> str:
        """``"filter"`` or ``"student"`` at ``position`` (0-based) of ``total`` epochs or steps."""
        current = self.rounds(total)[self.round_index(position, total)]
        return "filter" if position - current.start < current.filter else "student"

    def redundancy_in_filter_phase(self, position: int, total: int) -> bool:
        """Whether the filter phase at ``position`` includes the redundancy term."""
        return self.round_index(position, total) >= self.redundancy_from_round

    def _checked(self, position: int, total: int) -> tuple[Round, ...]:
        check_int("total", total, 1)
        check_int("position", position, 0)
        if position >= total:
            raise ValueError(f"position {position} outside [0, {total})")
        return self.rounds(total)

    # ---- equal student steps -------------------------------------------------------------------

    def total_for_student(self, student_positions: int) -> int:
        """The shortest schedule whose student positions are exactly ``student_positions``: the
        filter positions come on top, so a student distilled with RID is updated as often as one
        trained alone for ``student_positions`` epochs (or steps). ``ValueError`` if no schedule
        that can be honoured has that many."""
        check_int("student_positions", student_positions, 1)
        total = self._total_for_student(student_positions)
        if total is not None:
            return total
        smallest = self._shortest_valid_total()
        if smallest is not None and self.student_positions(smallest) > student_positions:
            fewer = self._fewest_rounds_hint(lambda s: s._total_for_student(student_positions) is not None)
            raise ValueError(
                f"{self._name()} needs at least {self.student_positions(smallest)} student {self.unit}s "
                f"({smallest} {self.unit}s in all); asked for {student_positions}: train the student longer"
                f"{fewer}"
            )
        below, above = self._neighbours(student_positions)
        raise ValueError(
            f"{self._name()}: no schedule has exactly {student_positions} student {self.unit}s (the paper's "
            f"placement skips some counts); {below[0]} {self.unit}s give {below[1]}, {above[0]} give {above[1]}"
        )

    def _window(self, student_positions: int) -> range:
        """Totals that may hold ``student_positions`` student positions: F ∈ [fT − R, fT + 2R]."""
        rest = 1.0 - self.filter_fraction
        low = max(1, math.floor((student_positions - self.n_rounds) / rest) - 1)
        return range(low, math.ceil((student_positions + 2 * self.n_rounds) / rest) + 2)

    def _total_for_student(self, student_positions: int) -> int | None:
        for total in self._window(student_positions):
            if self.student_positions(total) == student_positions and _problem(self, total) is None:
                return total
        return None

    def _neighbours(self, student_positions: int) -> tuple[tuple[int, int], tuple[int, int]]:
        counts = [(t, self.student_positions(t)) for t in self._window(student_positions) if _problem(self, t) is None]
        below = max((c for c in counts if c[1] < student_positions), key=lambda c: c[1], default=(0, 0))
        above = min((c for c in counts if c[1] > student_positions), key=lambda c: c[1], default=(0, 0))
        return below, above

    # ---- messages ------------------------------------------------------------------------------

    def _name(self) -> str:
        return (
            f"RIDSchedule(n_rounds={self.n_rounds}, filter_fraction={self.filter_fraction}, "
            f"placement={self.placement!r})"
        )

    def _search_limit(self) -> int:
        f = self.filter_fraction
        per_round = (math.ceil(1 / f) if f else 1) + math.ceil(1 / (1 - f)) + 2
        return 4 * self.n_rounds * per_round

    def _shortest_valid_total(self, at_least: int = 1) -> int | None:
        """The shortest total ≥ ``at_least`` that the schedule can honour (None past a generous bound)."""
        start = max(at_least, self.n_rounds)
        return next((t for t in range(start, start + self._search_limit()) if _problem(self, t) is None), None)

    def _fewest_rounds_hint(self, works) -> str:
        """ ", or n_rounds ≤ r" for the most rounds r < n_rounds with which ``works(schedule)`` holds."""
        for rounds in range(self.n_rounds - 1, 0, -1):
            if works(dataclasses.replace(self, n_rounds=rounds)):
                return f", or use n_rounds ≤ {rounds}"
        return ""

    def _cannot_place(self, total: int, reason: str) -> ValueError:
        unit = self.unit
        longer = self._shortest_valid_total(total + 1)
        advice = [f"use at least {longer} {unit}s"] if longer is not None else []
        fewer = self._fewest_rounds_hint(lambda s: _problem(s, total) is None)
        if fewer:
            advice.append(fewer.removeprefix(", or use "))
        if "filter" in reason:
            advice.append("a larger filter_fraction")
        needs = f"a filter {unit} and a student {unit}" if self.filter_fraction else f"a student {unit}"
        return ValueError(
            f"{self._name()} cannot give each of its {self.n_rounds} rounds {needs} in {_count(total, unit)} "
            f"({reason}): {', or '.join(advice) or 'use fewer rounds'}"
        )


def _rounds(schedule: RIDSchedule, total: int) -> tuple[Round, ...]:
    """The rounds of ``total`` positions, as placed (not yet checked)."""
    rounds_count, fraction = schedule.n_rounds, schedule.filter_fraction
    if schedule.placement == "even":
        bounds = [-(-k * total // rounds_count) for k in range(rounds_count + 1)]  # ⌈kT/R⌉
        marks = [_nearest(fraction * b) for b in bounds]
        return tuple(Round(bounds[k], bounds[k + 1] - bounds[k], marks[k + 1] - marks[k]) for k in range(rounds_count))
    length, left_over = divmod(total, rounds_count)
    per_round = schedule._paper_filter_per_round(length)
    rounds = [Round(k * length, length, per_round) for k in range(rounds_count)]
    if left_over:
        rounds.append(Round(rounds_count * length, left_over, min(per_round, left_over)))
    return tuple(rounds)


def _problem(schedule: RIDSchedule, total: int) -> str | None:
    """Why ``schedule`` cannot be honoured over ``total`` positions, or None."""
    unit = schedule.unit
    if total < schedule.n_rounds:
        return f"fewer {unit}s than rounds"
    rounds = _rounds(schedule, total)[: schedule.n_rounds]  # the paper's extra round is exempt
    for k, r in enumerate(rounds):
        if schedule.filter_fraction and r.filter < 1:
            return (
                f"round {k} would get no filter {unit}: a filter share of {schedule.filter_fraction} gives "
                f"{_count(schedule.filter_positions(total), 'filter ' + unit)} in all"
            )
        if r.filter >= r.length:
            return f"round {k} ({_count(r.length, unit)}, {r.filter} of them filter ones) would get no student {unit}"
    return None


@functools.lru_cache(maxsize=256)
def _layout(schedule: RIDSchedule, total: int) -> tuple[Round, ...]:
    check_int("total", total, 1)
    reason = _problem(schedule, total)
    if reason is not None:
        raise schedule._cannot_place(total, reason)
    return _rounds(schedule, total)
