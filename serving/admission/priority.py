"""Clinical priority classes (stat > interactive > batch): what a request asks for, what it may get.

Guarantees:
- Three classes, strictly ordered: ``stat`` (a clinician waits for it), ``interactive`` (the
  default), ``batch`` (backlogs, evaluation runs: idle capacity).
- A request asks with the header ``x-priority: stat|interactive|batch`` or with vLLM's body
  field ``priority`` (an integer, lower is more urgent: below 0 is ``stat``, 0 is
  ``interactive``, above 0 is ``batch``); the header wins when both are given. Without
  either it gets its key's default class.
- A class above what the key allows is refused with 403 ``priority_not_allowed``, never
  silently downgraded: a clinician who asked for STAT must know the request is not STAT.
  An unreadable class is a 400 ``invalid_priority``.
- The class never changes what a request costs; it decides which engine slots it may use
  (``serving.admission.queue``) and the ``priority`` vLLM schedules it with.
"""

from __future__ import annotations

from enum import Enum

from serving.admission.outcomes import AdmissionError, Outcome

PRIORITY_HEADER = b"x-priority"


class PriorityClass(str, Enum):
    STAT = "stat"
    INTERACTIVE = "interactive"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        """0 is the most urgent."""
        return _RANKS[self]

    @property
    def vllm_priority(self) -> int:
        """The ``priority`` vLLM's scheduler gets (``--scheduling-policy priority``: lower first)."""
        return self.rank - 1

    def above(self, other: PriorityClass) -> bool:
        """More urgent than ``other``."""
        return self.rank < other.rank


_RANKS = {PriorityClass.STAT: 0, PriorityClass.INTERACTIVE: 1, PriorityClass.BATCH: 2}
CLASSES = tuple(sorted(PriorityClass, key=lambda c: c.rank))  # most urgent first


def from_body_priority(value: object) -> PriorityClass:
    """vLLM's ``priority`` field as a class (lower is more urgent; 0 is vLLM's default)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdmissionError(Outcome.REJECTED_INVALID_PRIORITY, "The priority field must be an integer.")
    if value < 0:
        return PriorityClass.STAT
    return PriorityClass.INTERACTIVE if value == 0 else PriorityClass.BATCH


def requested_class(scope, body: dict, default: PriorityClass, allowed: PriorityClass) -> PriorityClass:
    """The class a request gets: what it asks for (header, else body field, else
    ``default``), refused when it is above ``allowed``."""
    asked = None
    for name, value in scope.get("headers", ()):
        if name == PRIORITY_HEADER:
            try:
                asked = PriorityClass(value.decode("latin-1").strip().lower())
            except ValueError:
                raise AdmissionError(
                    Outcome.REJECTED_INVALID_PRIORITY,
                    "The x-priority header must be one of: stat, interactive, batch.",
                ) from None
            break
    if asked is None and body.get("priority") is not None:
        asked = from_body_priority(body["priority"])
    if asked is None:
        return default
    if asked.above(allowed):
        raise AdmissionError(
            Outcome.REJECTED_PRIORITY_NOT_ALLOWED,
            f"This key may use priority classes up to {allowed.value!r}; the request asked for {asked.value!r}.",
        )
    return asked
