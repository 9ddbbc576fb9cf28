"""Sampling parameters for the job: the job's defaults, a row's own `sampling_params`, the effective values.

Names follow vLLM's `SamplingParams` (`temperature`, `top_p`, `top_k`, `stop`, `seed`, `n`), with
`max_new_tokens` for its `max_tokens`. A row's values override the job's. A row without a seed gets one
derived from the job's seed and its id: rows are independent of each other (two rows with the same prompt
get different completions) and a rerun reproduces them. Completion i of a row draws from the stream seeded
by `completion_seed(seed, i)` (decoding/sampling.py), whatever batch or worker decodes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from decoding import SamplingParams, completion_seed
from workers.configs import SamplingConfig, _check_n, _check_stop


class RowSamplingParams(BaseModel):
    """A row's own `sampling_params`: any subset of the job's keys, plus `max_new_tokens`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1024)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:  # strict mode refuses 1 for a float; JSON writes 1.0 as 1
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return _check_stop(value)


@dataclass(frozen=True)
class EffectiveSampling:
    """What one row is decoded with (recorded in its output rows' `sampling_params`)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int
    n: int

    def params(self, sample_index: int) -> SamplingParams:
        """The decoder's parameters for completion ``sample_index``."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, completion_seed(self.seed, sample_index))

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


def row_seed(job_seed: int, row_id: str) -> int:
    """The seed of a row that gives none: from the job's seed and the row's id."""
    digest = hashlib.sha256(f"{int(job_seed)}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_sampling(defaults: SamplingConfig, max_new_tokens: int, row_id: str, raw: Any) -> EffectiveSampling:
    """The row's effective parameters. Raises ValueError, saying what is wrong, for bad `sampling_params`."""
    if raw is None:
        own = RowSamplingParams()
    elif not isinstance(raw, dict):
        raise ValueError(f"'sampling_params' must be an object, got {type(raw).__name__}")
    else:
        try:
            own = RowSamplingParams.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'sampling_params'}: {e['msg']}"
                                 for e in exc.errors())
            raise ValueError(f"bad 'sampling_params': {problems}") from None
    given = own.model_dump(exclude_none=True)
    merged = {**defaults.model_dump(), "max_new_tokens": max_new_tokens, **given}
    _check_n(merged["n"], merged["temperature"])
    return EffectiveSampling(
        temperature=float(merged["temperature"]), top_p=float(merged["top_p"]), top_k=max(int(merged["top_k"]), 0),
        max_new_tokens=int(merged["max_new_tokens"]), stop=tuple(merged["stop"]),
        seed=int(merged["seed"]) if "seed" in given else row_seed(defaults.seed, row_id), n=int(merged["n"]))


class StopStrings:
    """A decoder stop check (decoding.batch.StopCheck) for stop strings, on the detokenised text.

    A string is complete at the first token whose text, with the tokens before it, contains the string while
    the text without that token does not. Only a window of recent tokens is decoded: enough for the longest
    string, so the check costs the same at token 10 and at token 10000.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        if not stops:
            raise ValueError("no stop strings")
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.window = max(len(s) for s in self.stops) + 8  # tokens: a token is at least one character (or byte)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __call__(self, ids: list[int], start: int) -> tuple[int, str] | None:
        for end in range(start + 1, len(ids) + 1):
            lo = max(0, end - self.window)
            before, after = self._text(ids[lo:end - 1]), self._text(ids[lo:end])
            for stop in self.stops:
                if stop in after and stop not in before:
                    return end, stop
        return None


def text_before_stop(text: str, stop_reason: str | None) -> str:
    """The output text cut before its stop string (vLLM's default: the stop string is not part of the text)."""
    if stop_reason is None:
        return text
    cut = text.find(stop_reason)
    return text if cut < 0 else text[:cut]
