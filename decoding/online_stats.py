"""Online statistics for ProPD: acceptance per (prompt token, rank) and step latency per tokens processed.

Acceptance is counted without bias: every guess is scored once the token it guessed is committed, whether
or not the tree walk ever reached it. (Counting only the guesses on accepted paths would inflate acceptance:
a path is only walked when its parents were right.) Guess i of a step predicts the i-th token after that
step's bonus token; the answer arrives one to k steps later.

Latency is modelled per number of tokens a step processes (batch x slots): a moving average per size that
was seen, and for unseen sizes a least-squares fit, weighted towards recent steps, of
seconds ~ a + b * tokens + c * tokens * context.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch


class AcceptanceTracker:
    """Counts of where the true token ranked among each prompt token's top_k guesses, blended with a prior
    table (the artifact's, measured offline) worth ``prior_weight`` observations per prompt token."""

    def __init__(self, prior: Sequence[Sequence[float]], k: int, top_k: int, prior_weight: float = 200.0):
        assert len(prior) >= k and all(len(row) >= top_k for row in prior[:k])
        self.k, self.top_k, self.prior_weight = k, top_k, prior_weight
        self.prior = [list(map(float, row[:top_k])) for row in prior[:k]]
        self.hits = [[0] * top_k for _ in range(k)]  # hits[i][r]: the true token was rank r of guess i
        self.scored = [0] * k  # guesses of prompt token i scored (hits plus misses)
        # Per input row: guesses waiting for their answer, as (output position of guess 0, [m][top_k] ids).
        self.pending: dict[int, deque[tuple[int, list[list[int]]]]] = {}

    def record(self, rows: Sequence[int], lengths: Sequence[int], guesses: torch.Tensor, counts: Sequence[int]) -> None:
        """This step's guesses: row ``rows[b]`` (an input index) has ``lengths[b]`` committed tokens; its
        ``counts[b]`` first guesses [b, :counts[b], :] predict its next output positions."""
        ids = guesses.tolist()  # [B, k, top_k]
        for row, length, row_ids, m in zip(rows, lengths, ids, counts):
            if m > 0:
                self.pending.setdefault(row, deque()).append((length, row_ids[:m]))

    def resolve(self, row: int, output: Sequence[int], finished: bool) -> None:
        """Score the row's pending guesses whose answers ``output`` (its committed tokens) now holds."""
        queue = self.pending.get(row)
        while queue:
            start, guesses = queue[0]
            known = min(len(guesses), len(output) - start)
            if known < len(guesses) and not finished:
                break  # wait for the rest (partially known sets are scored all at once, later)
            for i in range(max(known, 0)):
                self.scored[i] += 1
                truth = output[start + i]
                if truth in guesses[i]:
                    self.hits[i][guesses[i].index(truth)] += 1
            queue.popleft()
        if finished:
            self.pending.pop(row, None)

    def table(self) -> list[list[float]]:
        """a[i][r] = P(the true token is rank r of prompt token i's guesses), prior-smoothed."""
        w = self.prior_weight
        return [[(w * p + h) / (w + n) for p, h in zip(prior, hits)]
                for prior, hits, n in zip(self.prior, self.hits, self.scored)]


class LatencyModel:
    """Predicted seconds of a step over ``batch`` rows of ``slots`` input tokens each, ``context`` KV deep.

    The prior (the worker's start-up profile) gives the shape of the cost curve; the steps actually run
    correct it. A (batch, slots) pair that has run is predicted by its moving average. A pair only in the
    prior is predicted by the prior times the measured/prior ratio of the nearest pair that has run (same
    batch, nearest slot count; else the running ratio over all pairs): the profile ran under other
    conditions (one context length, no per-step bookkeeping), so its scale is off, and by different
    amounts for a 1-token step and a tree (here 1.2x against 1.35x). Any other pair comes from a fit over every
    measurement, newest weighted most: seconds ~ a + b * tokens + c * tokens * context + d * batch
    (tokens = batch x slots; the batch term carries per-row costs that tokens alone miss), and is never
    below the slowest known pair that did no more work (no more rows and no more slots).
    """

    def __init__(self, prior: Sequence[tuple[int, int, float, float]] = (), *, ema: float = 0.3,
                 scale_ema: float = 0.1, decay: float = 0.98, window: int = 256):
        self.ema, self.scale_ema, self.decay = ema, scale_ema, decay
        self.prior: dict[tuple[int, int], float] = {}  # (batch, slots) -> profiled seconds
        self.average: dict[tuple[int, int], float] = {}  # (batch, slots) -> moving average of steps run
        self.scale = 1.0  # measured / prior seconds, over the pairs that have both
        self.ratio: dict[tuple[int, int], float] = {}  # per pair that has both: measured / prior
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=window)  # (batch, slots, ctx, s)
        self._coef: torch.Tensor | None = None
        for batch, slots, context, seconds in prior:
            if seconds > 0 and math.isfinite(seconds):
                self.prior[(batch, slots)] = seconds
                self.history.append((float(batch), float(slots), float(context), seconds))

    def observe(self, batch: int, slots: int, context: float, seconds: float) -> None:
        """A step that ran."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        key = (batch, slots)
        if key in self.prior:
            self.scale = (1 - self.scale_ema) * self.scale + self.scale_ema * seconds / self.prior[key]
        old = self.average.get(key)
        if key in self.prior:
            self.ratio[key] = (seconds if old is None else (1 - self.ema) * old + self.ema * seconds) / self.prior[key]
        self.average[key] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        self.history.append((float(batch), float(slots), float(context), seconds))
        self._coef = None

    @staticmethod
    def _features(batch, slots, context):
        tokens = batch * slots
        return [1.0, tokens, tokens * context / 1024, batch]

    def _fit(self) -> torch.Tensor:
        """Weighted least squares (newest weight 1, then decay^age), lightly ridged: [a, b, c, d]."""
        if self._coef is None:
            h = torch.tensor(list(self.history), dtype=torch.float64)  # [n, 4]
            X = torch.tensor([self._features(b, s, c) for b, s, c, _ in self.history], dtype=torch.float64)
            w = self.decay ** torch.arange(len(h) - 1, -1, -1, dtype=torch.float64)  # [n]
            scale = X.abs().amax(0).clamp_min(1e-9)  # ridge on comparable columns
            Xs = X / scale
            A = Xs.T @ (w[:, None] * Xs) + 1e-6 * torch.eye(X.shape[1], dtype=torch.float64)
            self._coef = torch.linalg.solve(A, Xs.T @ (w * h[:, 3])) / scale
        return self._coef

    def _known(self, key: tuple[int, int]) -> float | None:
        if key in self.average:
            return self.average[key]
        if key in self.prior:
            batch, slots = key
            near = [k for k in self.ratio if k[0] == batch]
            if near:
                nearest = min(near, key=lambda k: abs(math.log(k[1] / slots)))
                return self.prior[key] * self.ratio[nearest]
            return self.prior[key] * self.scale
        return None

    def predict(self, batch: int, slots: int, context: float) -> float:
        known = self._known((batch, slots))
        if known is not None:
            return known
        if not self.history:
            return float(batch * slots)  # nothing measured: proportional to the work
        fitted = sum(c * f for c, f in zip(self._fit().tolist(), self._features(batch, slots, context)))
        floor = max((self._known(key) for key in {*self.average, *self.prior}
                     if key[0] <= batch and key[1] <= slots), default=0.0)
        return max(fitted, floor, 1e-9)
