"""Sets of row ids too large for Python sets, as 16-byte digests in numpy arrays.

A 10M-row input's ids as a Python set of strings take ~1 GB; here they take 16 bytes each (160 MB), plus an
8-byte sort order while an index is built. Ids are compared by their BLAKE2b-128 digest: two distinct ids
share one with probability 2^-128, so among 10M x 10M pairs the chance of any false match is ~3e-25.

A digest is two uint64 columns ``[n, 2]`` (hi, lo). ``DigestIndex`` sorts by hi (numpy's integer sort: 0.3 s
for 10M), and a run of equal hi (never seen at random, below 1e-5 at 10M rows) is settled by lo.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def sequence_digest(digests: np.ndarray | bytes) -> bytes:
    """16 bytes naming a sequence of ids, in order, from their ``id_digests`` (or those arrays' bytes)."""
    data = digests.tobytes() if isinstance(digests, np.ndarray) else digests
    return hashlib.blake2b(data, digest_size=16).digest()


def id_digests(ids: Iterable[str]) -> np.ndarray:
    """[n, 2] uint64: each id's BLAKE2b-128 digest as (hi, lo)."""
    buf = bytearray()
    blake = hashlib.blake2b
    for row_id in ids:
        buf += blake(row_id.encode(), digest_size=16).digest()  # ids are checked as valid Unicode first
    return np.frombuffer(bytes(buf), dtype=">u8").astype(np.uint64).reshape(-1, 2)


class DigestIndex:
    """The digests of ``n`` ids, sorted for lookups; ``order[k]`` is the position (in the order given) of the
    k-th smallest."""

    def __init__(self, digests: np.ndarray):
        assert digests.ndim == 2 and digests.shape[1] == 2, digests.shape
        self.order = np.argsort(digests[:, 0], kind="stable")  # [n]
        self.hi = digests[self.order, 0]  # [n]
        self.lo = digests[self.order, 1]  # [n]
        # Runs of equal hi (at random, rare; many only when ids repeat) are ordered by lo as well, so equal
        # digests sit side by side, each run once.
        same = self.hi[1:] == self.hi[:-1]  # [n-1]: k+1 has k's hi
        starts = np.flatnonzero(same & ~np.r_[False, same[:-1]])
        stops = np.flatnonzero(same & ~np.r_[same[1:], False]) + 2
        for start, stop in zip(starts, stops):
            run = np.argsort(self.lo[start:stop], kind="stable") + start
            self.order[start:stop], self.lo[start:stop] = self.order[run], self.lo[run]

    def __len__(self) -> int:
        return len(self.hi)

    def duplicates(self) -> np.ndarray:
        """[d, 2] int64 pairs (first, later) of positions holding equal digests, by later position: each later
        position once, with the first position of its digest (the sort is stable, so a run of equal digests
        is in the order given)."""
        equal = (self.hi[1:] == self.hi[:-1]) & (self.lo[1:] == self.lo[:-1])  # [n-1]: k+1 repeats k
        run_start = np.maximum.accumulate(np.where(np.r_[True, ~equal], np.arange(len(self)), 0))  # [n]
        later = np.flatnonzero(equal) + 1
        pairs = np.stack([self.order[run_start[later]], self.order[later]], axis=1).astype(np.int64)
        return pairs[np.argsort(pairs[:, 1], kind="stable")]

    def find(self, digests: np.ndarray) -> np.ndarray:
        """[m] int64: for each digest, the position (in the order given to the index) holding it, or -1."""
        m = len(digests)
        found = np.full(m, -1, dtype=np.int64)
        if m == 0 or len(self) == 0:
            return found
        by_hi = np.argsort(digests[:, 0], kind="stable")  # sorted queries: searchsorted stays in cache
        hi, lo = digests[by_hi, 0], digests[by_hi, 1]
        k = np.minimum(np.searchsorted(self.hi, hi, side="left"), len(self) - 1)
        hit = (self.hi[k] == hi) & (self.lo[k] == lo)
        found[by_hi[hit]] = self.order[k[hit]]
        for q in np.flatnonzero(~hit & (self.hi[k] == hi)):  # a run of equal hi: look along it for lo
            j = int(k[q])
            while j < len(self) and self.hi[j] == hi[q]:
                if self.lo[j] == lo[q]:
                    found[by_hi[q]] = self.order[j]
                    break
                j += 1
        return found
