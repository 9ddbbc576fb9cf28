"""Online statistics for ProPD: acceptance per (prompt token, rank), the tokens each tree set really yields
per row-step, and step latency per tokens processed.

Acceptance is counted without bias: every guess is scored once the token it guessed is committed, whether
or not the tree walk ever reached it. (Counting only the guesses on accepted paths would inflate acceptance:
a path is only walked when its parents were right.) Guess i of a step predicts the i-th token after that
step's bonus token; the answer arrives one to k steps later.

The table's tau for a tree set is a stationary figure under an independence assumption across depths; what
a set really yields can be lower, so ProPD also learns it (``YieldTracker``), the table's figure as a prior.

Latency is modelled per (batch, slots) pair: a moving average per pair that was run (each observation first
clipped to a band around the current estimate, so one stalled step cannot swing it), the profile corrected
by the nearest pair run, interpolation between profiled batch sizes, and otherwise a least-squares fit,
weighted towards recent steps, of seconds ~ a + b * tokens + c * tokens * context + d * batch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence

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

    def record(self, rows: Sequence[int], lengths: Sequence[int], guesses: Sequence[Sequence[int]],
               counts: Sequence[int]) -> None:
        """This step's guesses: row ``rows[b]`` (an input index) has ``lengths[b]`` committed tokens; its
        ``counts[b]`` first guesses predict its next output positions. ``guesses[b]`` is flat, [k * top_k]
        (guess i's ranks at i * top_k ..); only the first ``top_k`` ranks of each are scored."""
        for row, length, flat, m in zip(rows, lengths, guesses, counts):
            if m > 0:
                width = len(flat) // self.k
                ranked = [list(flat[i * width : i * width + self.top_k]) for i in range(m)]
                self.pending.setdefault(row, deque()).append((length, ranked))

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


class YieldTracker:
    """Tokens per row-step that each tree set (any hashable key) really yields, learned online.

    The table's figure for a set is usually off, and off for every set alike (acceptance measured on other
    text, guesses at different depths assumed independent), so the estimate has two levels:

    - A pooled factor s: the extra tokens (beyond the bonus token every step emits) that the sets yielded,
      over the extra tokens their table figures promised for the same row-steps. It starts at 1, worth
      ``pool_weight`` promised extra tokens. A set's prior is 1 + s * (table figure - 1): a set not yet run
      learns from the others, so finding that the table is optimistic does not take a trial of every set.
    - The set's own row-steps, that prior worth ``prior_weight`` row-steps:
      (w * prior + sum of tokens) / (w + row-steps).

    Both weights are about what Bayes would give: a row-step's tokens vary by ~0.7 (variance ~0.5) and the
    table is typically off by 10-20% (~0.2 tokens, variance ~0.04), so the table is worth ~0.5 / 0.04 ~ 12
    row-steps. Lighter priors let one unlucky step (at batch 1, a single row's) condemn a good set, and
    through the pooled factor every set at once.

    Every observed step multiplies all evidence by ``decay`` (memory ~1/(1 - decay) steps), for two reasons:
    the yield drifts with the prompts decoded, and an estimate knocked down by an unlucky run would
    otherwise stay down for good, since a set that is never chosen is never measured again. With decay its
    own evidence fades, it returns to its prior, and it is retried now and then (and knocked down again in
    a few steps if it really is poor). A set run without a break keeps ~batch/(1 - decay) row-steps of
    evidence, far more than the prior. Plain decoding (1 token per row-step, as promised) needs no
    learning and gets none: it adds nothing to the pooled factor and its own mean is its prior.
    """

    def __init__(self, prior_weight: float = 16.0, pool_weight: float = 16.0, decay: float = 0.997):
        assert prior_weight > 0 and pool_weight > 0 and 0 < decay <= 1
        self.prior_weight, self.pool_weight, self.decay = prior_weight, pool_weight, decay
        self.tokens: dict[Hashable, float] = {}  # key -> decayed sum of tokens emitted
        self.row_steps: dict[Hashable, float] = {}  # key -> decayed count of row-steps observed
        self.extra_seen = self.extra_promised = 0.0  # decayed sums over all sets, for the pooled factor

    def observe(self, key: Hashable, predicted: float, tokens: Sequence[int]) -> None:
        """One decoding step of set ``key`` (table figure ``predicted``): ``tokens`` are what each row whose
        yield counts emitted (may be empty)."""
        for k in self.row_steps:
            self.tokens[k] *= self.decay
            self.row_steps[k] *= self.decay
        self.extra_seen *= self.decay
        self.extra_promised *= self.decay
        if tokens:
            self.tokens[key] = self.tokens.get(key, 0.0) + float(sum(tokens))
            self.row_steps[key] = self.row_steps.get(key, 0.0) + len(tokens)
            self.extra_seen += float(sum(tokens)) - len(tokens)
            self.extra_promised += (predicted - 1) * len(tokens)

    @property
    def pooled(self) -> float:
        """s: extra tokens yielded per extra token promised, over every set."""
        return (self.pool_weight + self.extra_seen) / (self.pool_weight + self.extra_promised)

    def estimate(self, key: Hashable, predicted: float) -> float:
        """Expected tokens per row-step of ``key``, whose table figure is ``predicted``."""
        w, n = self.prior_weight, self.row_steps.get(key, 0.0)
        prior = 1 + self.pooled * (predicted - 1)
        return (w * prior + self.tokens.get(key, 0.0)) / (w + n)

    def new_table(self, keys: Sequence[Hashable]) -> None:
        """The family was rebuilt from a newer table: forget the sets not in ``keys`` and the pooled factor
        (it measured the old table's promises, which the new one has already corrected in part)."""
        for k in set(self.row_steps) - set(keys):
            del self.tokens[k], self.row_steps[k]
        self.extra_seen = self.extra_promised = 0.0


class LatencyModel:
    """Predicted seconds of a step over ``batch`` rows of ``slots`` input tokens each, ``context`` KV deep.

    ``prior``: the worker's start-up profile, (batch, slots, context, seconds) points; ``observe`` adds the steps
    run. ``predict`` prices a (batch, slots) pair by the first of these that applies:
    1. it has run: its moving average, times the machine's drift since that average was set;
    2. it is profiled: its profiled seconds times the measured/profiled ratio of the nearest profiled slot count
       run at this batch size, else the running ratio over every profiled pair run (``scale``). The profile's
       scale is off (one context length, no per-step bookkeeping), and by different amounts for a 1-slot step
       and a tree (measured: 1.2x against 1.35x);
    3. its slot count is known at a larger batch size: linear in batch between the nearest known batch sizes,
       or below the smallest, that price scaled by batch. A fit linear in tokens misprices wide trees on a
       launch-bound GPU, where 200 slots cost little more than 1;
    4. otherwise a least-squares fit over the latest ``window`` points, weighted ``decay`` ** age:
       seconds ~ a + b * tokens + c * tokens * context + d * batch (tokens = batch x slots; the batch term
       carries per-row costs).
    Cases 3 and 4 are never below the slowest known pair with no more rows and no more slots.

    Only the pair run is measured, and a pair tends to be left when its estimate is high, so the noise of
    estimates (single steps vary by tens of percent) becomes a bias against the pairs not in use. Hence:
    - a step is clipped to [ref / clip, ref * clip] before use, ref the pair's average, or before its first run
      its price from case 2 or 3 with the band squared; never the fit alone, which below every profiled batch
      size can price a wide tree near zero and the clip would hold it there (measured: 192-slot trees priced
      at ~0 s, real steps 1.5 s). In steady use a stalled step moves an average by at most ema * (clip - 1);
    - a pair's average is the plain mean of its first 1/ema steps, then a moving average of weight ``ema``;
    - the shared ``drift`` moves with a pair's average while that pair runs steadily (the same pair as the step
      before, past its first 1/ema steps), so pairs not in use follow the machine's speed (measured on a 2-core
      VM: plain decoding at batch 1 went 45 -> 57 ms in a busy spell; with the trees' prices left as they were,
      ProPD chose trees that lost by 10%);
    - a pair's first step after another pair's weighs at least ``returning_weight`` and moves no drift: it
      tells about the pair, not the machine. The drift cannot fix the relative error of two pairs measured at
      different times; ProPD re-runs near options for that (``has_run`` with ``within``).
    """

    def __init__(self, prior: Sequence[tuple[int, int, float, float]] = (), *, ema: float = 0.1,
                 scale_ema: float = 0.1, decay: float = 0.98, window: int = 256, clip: float = 1.5,
                 refit_every: int = 16, returning_weight: float = 0.5):
        assert clip >= 1
        self.ema, self.scale_ema, self.decay, self.clip = ema, scale_ema, decay, clip
        self.prior: dict[tuple[int, int], float] = {}  # (batch, slots) -> profiled seconds
        self.average: dict[tuple[int, int], float] = {}  # (batch, slots) -> moving average of steps run
        self.runs: dict[tuple[int, int], int] = {}  # (batch, slots) -> steps run
        self.scale = 1.0  # measured / prior seconds, over the pairs that have both
        self.drift = 1.0  # the machine's speed factor now (1 at the start; see the class docstring)
        self.drift_at: dict[tuple[int, int], float] = {}  # (batch, slots) -> the drift when its average was set
        self.observed = 0  # steps observed so far
        self.last_run: dict[tuple[int, int], int] = {}  # (batch, slots) -> self.observed at its latest step
        self.last_key: tuple[int, int] | None = None  # the pair of the latest step
        self.run_profiled: dict[int, list[int]] = {}  # batch -> slot counts run there that the profile has too
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=window)  # (batch, slots, ctx, s)
        self._coef: torch.Tensor | None = None
        self.refit_every, self.returning_weight = refit_every, returning_weight
        self._since_fit = 0  # observations since the fit was computed
        for batch, slots, context, seconds in prior:
            if seconds > 0 and math.isfinite(seconds):
                self.prior[(batch, slots)] = seconds
                self.history.append((float(batch), float(slots), float(context), seconds))

    def observe(self, batch: int, slots: int, context: float, seconds: float) -> None:
        """A step that ran."""
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        key = (batch, slots)
        old = self._average(key) if key in self.average else None  # rebased to the machine's speed now
        # Clipped against the pair's average, or before its first run against a price grounded in measurements
        # of its slot count (its own profile point, or other batch sizes); never against the fit alone, which
        # below every profiled batch size can price a wide tree near zero (see the class docstring).
        reference, band = (old, self.clip) if old is not None else (self._grounded(batch, slots), self.clip ** 2)
        if reference is not None:
            seconds = min(max(seconds, reference / band), reference * band)
        runs = self.runs[key] = self.runs.get(key, 0) + 1
        weight = max(self.ema, 1 / runs)  # the plain mean of the first 1/ema steps, then a moving average
        returning = key != self.last_key and old is not None
        if returning:  # back after a gap: its old average is old news (see the class docstring)
            weight = max(weight, self.returning_weight)
        new = seconds if old is None else (1 - weight) * old + weight * seconds
        if old is not None and not returning and weight <= self.ema:  # in steady use: its change is the machine's
            self.drift *= new / old
        self.average[key], self.drift_at[key] = new, self.drift
        if old is None and key in self.prior:
            self.run_profiled.setdefault(batch, []).append(slots)
        self.observed += 1
        self.last_run[key], self.last_key = self.observed, key
        if key in self.prior:
            self.scale = (1 - self.scale_ema) * self.scale + self.scale_ema * seconds / self.prior[key]
        self.history.append((float(batch), float(slots), float(context), seconds))
        self._since_fit += 1

    def _average(self, key: tuple[int, int]) -> float:
        """A pair's moving average, carried to the machine's speed now."""
        return self.average[key] * self.drift / self.drift_at[key]

    def has_run(self, batch: int, slots: int, within: int | None = None) -> bool:
        """Whether a step of this (batch, slots) pair has been measured (else its price is an estimate); with
        ``within``, among the latest ``within`` steps observed."""
        last = self.last_run.get((batch, slots))
        return last is not None and (within is None or self.observed - last < within)

    @staticmethod
    def _features(batch, slots, context):
        tokens = batch * slots
        return [1.0, tokens, tokens * context / 1024, batch]

    def _fit(self) -> torch.Tensor:
        """Weighted least squares (newest weight 1, then decay^age), lightly ridged: [a, b, c, d]. Refitted
        once ``refit_every`` steps have been observed since the last fit, not after every step: a fit costs
        ~2 ms on a CPU, 4% of a 45 ms step, for a fallback whose memory is ~1/(1 - decay) = 50 steps."""
        if self._coef is None or self._since_fit >= self.refit_every:
            self._since_fit = 0
            h = torch.tensor(list(self.history), dtype=torch.float64)  # [n, 4]
            X = torch.tensor([self._features(b, s, c) for b, s, c, _ in self.history], dtype=torch.float64)
            w = self.decay ** torch.arange(len(h) - 1, -1, -1, dtype=torch.float64)  # [n]
            scale = X.abs().amax(0).clamp_min(1e-9)  # ridge on comparable columns
            Xs = X / scale
            A = Xs.T @ (w[:, None] * Xs) + 1e-6 * torch.eye(X.shape[1], dtype=torch.float64)
            self._coef = torch.linalg.solve(A, Xs.T @ (w * h[:, 3])) / scale
        return self._coef

    def _known_price(self, key: tuple[int, int]) -> float:
        """``_known`` of a pair measured or profiled."""
        price = self._known(key)
        assert price is not None, key
        return price

    def _known(self, key: tuple[int, int]) -> float | None:
        if key in self.average:
            return self._average(key)
        if key in self.prior:
            batch, slots = key
            # Kept by observe(), not found by a scan of every pair here (measured: the scan cost 30 ms on a CPU,
            # a third of a ProPD step at an unprofiled batch size).
            near = self.run_profiled.get(batch)
            if near:
                nearest = (batch, min(near, key=lambda s: abs(math.log(s / slots))))
                return self.prior[key] * self._average(nearest) / self.prior[nearest]
            return self.prior[key] * self.scale
        return None

    def _between(self, batch: int, slots: int) -> float | None:
        """Linear interpolation in batch between the nearest known pairs of this slot count on either side;
        below the smallest known batch size, that pair's seconds scaled by batch (a lower bound: a step has
        fixed costs), which keeps the relative prices of slot counts that the profile measured there."""
        batches = {b for b, s in (*self.average, *self.prior) if s == slots}
        below, above = [b for b in batches if b < batch], [b for b in batches if b > batch]
        if not above:
            return None
        hi = min(above)
        t_hi = self._known_price((hi, slots))
        if not below:
            return t_hi * batch / hi
        lo = max(below)
        t_lo = self._known_price((lo, slots))
        return t_lo + (t_hi - t_lo) * (batch - lo) / (hi - lo)

    def _grounded(self, batch: int, slots: int) -> float | None:
        """The pair's price from measurements of its own slot count (at this or other batch sizes), or None
        when only the fit could price it."""
        known = self._known((batch, slots))
        return known if known is not None else self._between(batch, slots)

    def predict(self, batch: int, slots: int, context: float) -> float:
        known = self._known((batch, slots))
        if known is not None:
            return known
        if not self.history:
            return float(batch * slots)  # nothing measured: proportional to the work
        estimate = self._between(batch, slots)
        if estimate is None:
            estimate = sum(c * f for c, f in zip(self._fit().tolist(), self._features(batch, slots, context)))
        floor = max((self._known_price(key) for key in {*self.average, *self.prior}
                     if key[0] <= batch and key[1] <= slots), default=0.0)
        return max(estimate, floor, 1e-9)
