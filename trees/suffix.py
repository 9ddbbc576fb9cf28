"""A model-free speculator, for comparison with prompt tokens: a suffix index over earlier outputs (and the row's
own text) that proposes a token tree of likely continuations, as Suffix Decoding does (Arctic Inference;
arXiv 2411.04975; vLLM's ``suffix`` method), and an exact replay of greedy decoding with it.

At each step the longest suffix of the row's text (up to ``max_match`` tokens) that occurs in the index (or in
the row's own text so far, whichever matches longer) is looked up; the continuations after its occurrences (the
latest ``max_occurrences``) form a trie, whose ``max_nodes`` most frequent nodes (every node's parent kept) are
the step's candidates. Verification accepts the longest path
of the trie that the true text follows, plus the bonus token, as PPD's does: replaying a known greedy
continuation therefore gives the steps a decoder with this speculator would take.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence

Trie = dict[int, "Trie"]


class SuffixIndex:
    """Every position of every added sequence, keyed by the ``n`` tokens ending there, for n = 1 .. max_match."""

    def __init__(self, max_match: int = 8):
        self.max_match = max_match
        self.sequences: list[list[int]] = []
        self.ends: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)  # n-gram -> (seq, end)

    def add(self, tokens: Sequence[int]) -> int:
        """Index a sequence; returns its number (``extend`` it as it grows)."""
        self.sequences.append([])
        number = len(self.sequences) - 1
        self.extend(number, tokens)
        return number

    def extend(self, number: int, tokens: Sequence[int]) -> None:
        seq = self.sequences[number]
        for token in tokens:
            seq.append(int(token))
            end = len(seq)
            for n in range(1, min(self.max_match, end) + 1):
                self.ends[tuple(seq[end - n:end])].append((number, end))

    def propose(self, context: Sequence[int], max_nodes: int, max_depth: int,
                max_occurrences: int = 64) -> tuple[int, Trie]:
        """(n, the candidate trie after ``context``): the continuations of its longest suffix found in the index,
        n tokens long (0 and an empty trie when not even its last token is)."""
        for n in range(min(self.max_match, len(context)), 0, -1):
            found = [(number, end) for number, end in self.ends.get(tuple(context[len(context) - n:]), ())
                     if end < len(self.sequences[number])]  # something follows (not the context itself)
            if found:
                return n, _top_nodes(self.sequences, found[-max_occurrences:], max_nodes, max_depth)
        return 0, {}


def _top_nodes(sequences: list[list[int]], occurrences: list[tuple[int, int]], max_nodes: int,
               max_depth: int) -> Trie:
    """The ``max_nodes`` trie nodes followed by the most occurrences (ties: shallower, then first seen)."""
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for number, end in occurrences:
        continuation = sequences[number][end:end + max_depth]
        for depth in range(1, len(continuation) + 1):
            counts[tuple(continuation[:depth])] += 1
    # A child never has more occurrences than its parent, so the top nodes by count (parents first on ties)
    # always form a tree.
    ranked = heapq.nsmallest(max_nodes, counts.items(), key=lambda kv: (-kv[1], len(kv[0])))
    trie: Trie = {}
    for path, _ in sorted(ranked, key=lambda kv: len(kv[0])):
        node = trie
        for token in path[:-1]:
            node = node[token]
        node[path[-1]] = {}
    return trie


def accepted(trie: Trie, truth: Sequence[int]) -> int:
    """How many of ``truth``'s tokens the trie's longest matching path covers."""
    node, depth = trie, 0
    while depth < len(truth) and truth[depth] in node:
        node = node[truth[depth]]
        depth += 1
    return depth


def replay_suffix(rows: Sequence[tuple[Sequence[int], Sequence[int]]], index: SuffixIndex, max_nodes: int = 63,
                  max_depth: int = 8) -> tuple[int, int]:
    """(tokens, steps) of greedy decoding ``rows`` (prompt ids, output ids) in order with the suffix speculator;
    each row's own text is searched as it grows, and its output joins ``index`` once the row is done. The first
    step of a row emits one token (the prefill), as PPD's does."""
    tokens = steps = 0
    for prompt, output in rows:
        own = SuffixIndex(index.max_match)
        own_number = own.add(prompt)
        emitted = 1 if output else 0
        steps += emitted
        own.extend(own_number, output[:emitted])
        while emitted < len(output):
            context = list(prompt) + list(output[:emitted])
            # The row's own text or the earlier outputs, whichever matches the longer suffix (the row's on ties).
            (_, trie), _ = max((own.propose(context, max_nodes, max_depth), 1),
                               (index.propose(context, max_nodes, max_depth), 0), key=lambda p: (p[0][0], p[1]))
            step = min(accepted(trie, output[emitted:]) + 1, len(output) - emitted)
            own.extend(own_number, output[emitted:emitted + step])
            emitted += step
            steps += 1
        tokens += len(output)
        index.add(output)
    return tokens, steps
