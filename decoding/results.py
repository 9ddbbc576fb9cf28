"""Typed per-row results shared by every decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # an EOS token or a stop string was emitted (included in token_ids)
    LENGTH = "length"  # max_new_tokens reached


@dataclass
class RowResult:
    """What one prompt row produced. Decoders return these in input order."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_steps: int = 0  # forward passes that emitted tokens for this row (the first token included)
    accepted_per_step: list[int] = field(default_factory=list)  # tokens emitted by each step
    stop_reason: str | None = None  # the stop string that ended the row (None: EOS, length or not finished)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per forward step (1.0 for plain decoding)."""
        return self.num_tokens / self.num_steps if self.num_steps else 0.0
