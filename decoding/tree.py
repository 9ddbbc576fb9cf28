"""PPD token trees: a tree is data (paths of ranks plus prompt-token counts), turned once into tensors.

A node is a path of ranks ``(r1, r2, ...)``: rank ``r1`` of prompt token 1's guesses, then rank ``r2`` of
prompt token 2's guesses, and so on (a Cartesian product, as in Medusa). The root ``()`` is the last emitted
token, whose KV is not yet in the cache. Every node also carries 0..k prompt tokens: if the node ends up the
deepest accepted one, the logits of its prompt tokens are the next step's guesses, and their count is the
next step's *depth state* (how deep its tree may go). A ``TreeSet`` holds one tree per depth state 0..k.

Slot layout of one tree's input, fixed so nodes are always the leading slots:
    [root, candidates (sorted by depth, then ranks), prompt slots (node by node, token j, ensemble copy e)]
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

Path = tuple[int, ...]

# Slot kinds of a tree input.
ROOT, CANDIDATE, PROMPT, PAD = 0, 1, 2, 3


@dataclass(frozen=True)
class TreeSpec:
    """One tree: candidate paths (root excluded) and the prompt-token count of every node (root first)."""

    paths: tuple[Path, ...]
    prompt_counts: tuple[int, ...]  # len(paths) + 1: index 0 is the root, then paths in order

    @staticmethod
    def build(prompt_counts: Mapping[Sequence[int], int]) -> TreeSpec:
        """From ``{path: prompt count}``; the root ``()`` must be present. Paths are put in canonical order."""
        counts = {tuple(p): int(c) for p, c in prompt_counts.items()}
        if () not in counts:
            raise ValueError("a tree needs the root () with its prompt-token count")
        paths = tuple(sorted((p for p in counts if p), key=lambda p: (len(p), p)))
        return TreeSpec(paths=paths, prompt_counts=(counts[()],) + tuple(counts[p] for p in paths))

    def __post_init__(self) -> None:
        if len(self.prompt_counts) != len(self.paths) + 1:
            raise ValueError("prompt_counts needs one entry per node, the root first")
        seen: set[Path] = {()}
        for path in self.paths:
            if not path:
                raise ValueError("the root () is implicit; do not list it among paths")
            if path in seen:
                raise ValueError(f"duplicate path {path}")
            if path[:-1] not in seen:
                raise ValueError(f"path {path} has no parent {path[:-1]} before it (order by depth, then ranks)")
            if min(path) < 0:
                raise ValueError(f"negative rank in path {path}")
            seen.add(path)
        if min(self.prompt_counts) < 0:
            raise ValueError("prompt-token counts must be >= 0")

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def num_slots(self) -> int:
        """Input tokens per row before ensemble copies: nodes plus prompt tokens."""
        return self.num_nodes + sum(self.prompt_counts)

    def to_json(self) -> list:
        return [[list(p), c] for p, c in zip(((),) + self.paths, self.prompt_counts)]

    @staticmethod
    def from_json(items: Iterable) -> TreeSpec:
        return TreeSpec.build({tuple(p): c for p, c in items})


@dataclass(frozen=True)
class TreeSet:
    """One tree per depth state m = 0..k (m = how many prompt-token guesses the row holds)."""

    k: int  # prompt tokens per node at most; also the deepest possible guess
    top_k: int  # candidates are drawn from the top_k tokens of each guess
    trees: tuple[TreeSpec, ...]

    def __post_init__(self) -> None:
        if self.k < 1 or self.top_k < 1:
            raise ValueError("k and top_k must be >= 1")
        if len(self.trees) != self.k + 1:
            raise ValueError(f"need one tree per depth state 0..{self.k}, got {len(self.trees)}")
        for state, tree in enumerate(self.trees):
            if tree.depth > state:
                raise ValueError(f"tree for depth state {state} is {tree.depth} deep; it may use {state} guesses")
            if any(r >= self.top_k for p in tree.paths for r in p):
                raise ValueError(f"tree for depth state {state} uses a rank >= top_k={self.top_k}")
            if max(tree.prompt_counts) > self.k:
                raise ValueError(f"tree for depth state {state} gives a node more than k={self.k} prompt tokens")

    def to_json(self) -> dict:
        return {"k": self.k, "top_k": self.top_k, "trees": [t.to_json() for t in self.trees]}

    @staticmethod
    def from_json(data: Mapping) -> TreeSet:
        return TreeSet(k=int(data["k"]), top_k=int(data["top_k"]),
                       trees=tuple(TreeSpec.from_json(t) for t in data["trees"]))

    @property
    def root_only(self) -> bool:
        """Plain decoding: every state's tree is the root alone, without prompt tokens (one slot per row)."""
        return all(tree.num_slots == 1 for tree in self.trees)

    @property
    def tree_hash(self) -> str:
        """Stable identity of the tree set, for provenance in outputs."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class TreeOption:
    """One tree set of a ProPD family (decoding/propd.py) with the tokens per step it is expected to emit; tree
    search (trees/builder.py) produces them."""

    tree_set: TreeSet
    expected_tokens: float  # tau under the acceptance table it was built from


# ----------------------------------------------------------------------------------------------------------------
# Named tree sets


def chain_tree_set(k: int = 3, top_k: int = 10, prompt_count: int | None = None) -> TreeSet:
    """Rank-0 chains: state m gets a chain of m nodes; every node carries ``prompt_count`` (default k)."""
    c = k if prompt_count is None else prompt_count
    trees = [TreeSpec.build({(0,) * d: (k if d == 0 else c) for d in range(m + 1)}) for m in range(k + 1)]
    return TreeSet(k=k, top_k=top_k, trees=tuple(trees))


def rank_budget_tree_set(k: int = 3, top_k: int = 10, rank_budget: int = 4) -> TreeSet:
    """Paths whose rank sum plus extra depth stays under ``rank_budget``: wide near the root, thin deep down.

    A node with a low rank sum is more likely accepted and deepest, so it carries more prompt tokens
    (k minus its rank sum, at least 1). State m keeps the nodes of depth <= m.
    """
    full: dict[Path, int] = {(): k}
    frontier: list[Path] = [()]
    while frontier:
        nxt = []
        for parent in frontier:
            if len(parent) == k:
                continue
            for r in range(top_k):
                child = parent + (r,)
                if sum(child) + len(child) - 1 >= rank_budget:
                    break
                full[child] = max(1, k - sum(child))
                nxt.append(child)
        frontier = nxt
    trees = [TreeSpec.build({p: c for p, c in full.items() if len(p) <= m}) for m in range(k + 1)]
    return TreeSet(k=k, top_k=top_k, trees=tuple(trees))


def default_tree_set(k: int = 3, top_k: int = 10) -> TreeSet:
    """A moderate sparse tree (14 candidates at state 3): PPDDecoder's tree when none is given, and the
    workers' for prompt tokens without an acceptance table (workers/planning.py)."""
    return rank_budget_tree_set(k=k, top_k=top_k, rank_budget=4)


def vanilla_tree_set(k: int = 3, top_k: int = 10) -> TreeSet:
    """Root only, no prompt tokens: one token per step, i.e. plain decoding through the tree machinery."""
    return TreeSet(k=k, top_k=top_k, trees=tuple(TreeSpec.build({(): 0}) for _ in range(k + 1)))


def on_whole_root_path(flag: torch.Tensor, ancestor_or_self: torch.Tensor) -> torch.Tensor:
    """flag [B, C] bool per node -> [B, C]: the node and every one of its ancestors have the flag (verification
    accepts such a chain of matches; pruning keeps such a chain of likely nodes)."""
    return (flag[:, None, :] | ~ancestor_or_self).all(-1)


# ----------------------------------------------------------------------------------------------------------------
# Buffers


@dataclass(frozen=True)
class TreeBuffers:
    """The tensors of one tree with ``n`` ensemble copies per prompt token (N slots, C+1 nodes, depth D)."""

    attend: torch.Tensor  # [N, N] bool: query slot i may attend key slot j
    position_offsets: torch.Tensor  # [N] long: position minus the root's position
    slot_kind: torch.Tensor  # [N] long: ROOT / CANDIDATE / PROMPT / PAD
    guess_index: torch.Tensor  # [N] long: (depth-1)*top_k + rank for candidates, else 0
    prompt_index: torch.Tensor  # [N] long: (token j-1)*n + copy e for prompt slots, else 0
    node_parent: torch.Tensor  # [C+1] long: parent node (root: itself)
    node_depth: torch.Tensor  # [C+1] long
    node_valid: torch.Tensor  # [C+1] bool (False only for padding in a stacked set)
    ancestor_or_self: torch.Tensor  # [C+1, C+1] bool: [i, a] = a is i or one of its ancestors
    node_path: torch.Tensor  # [C+1, D+1] long: node slots from the root down to the node, padded with the node
    node_prompt_slots: torch.Tensor  # [C+1, k, n] long: slots of the node's prompt tokens, padded with 0
    node_prompt_count: torch.Tensor  # [C+1] long
    slot_node: torch.Tensor  # [N] long: the node a slot belongs to (a node itself, a prompt slot's node; pad: 0)
    internal_nodes: torch.Tensor  # [I] long: the nodes with children (their early-pruning head is read), pad 0


def tree_buffers(tree: TreeSpec, *, k: int, top_k: int, n: int = 1, max_depth: int | None = None) -> TreeBuffers:
    """Turn one tree into its tensors (on CPU). ``max_depth`` pads node paths to a common depth."""
    nodes: list[Path] = [()] + list(tree.paths)
    node_of = {p: i for i, p in enumerate(nodes)}
    num_nodes = len(nodes)
    # Prompt slots follow the nodes: node by node, token j, copy e.
    prompt_slots: list[tuple[int, int, int]] = [
        (c, j, e) for c, count in enumerate(tree.prompt_counts) for j in range(count) for e in range(n)
    ]
    num_slots = num_nodes + len(prompt_slots)
    depth_pad = tree.depth if max_depth is None else max_depth
    assert depth_pad >= tree.depth

    ancestors = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for i, p in enumerate(nodes):
        for d in range(len(p) + 1):
            ancestors[i, node_of[p[:d]]] = True

    attend = torch.zeros(num_slots, num_slots, dtype=torch.bool)
    attend[:num_nodes, :num_nodes] = ancestors
    position_offsets = torch.zeros(num_slots, dtype=torch.long)
    slot_kind = torch.full((num_slots,), CANDIDATE, dtype=torch.long)
    slot_kind[0] = ROOT
    guess_index = torch.zeros(num_slots, dtype=torch.long)
    prompt_index = torch.zeros(num_slots, dtype=torch.long)
    node_prompt_slots = torch.zeros(num_nodes, k, n, dtype=torch.long)
    slot_node = torch.arange(num_slots, dtype=torch.long)  # nodes own themselves; prompt slots are set below
    for i, p in enumerate(nodes):
        position_offsets[i] = len(p)
        if p:
            guess_index[i] = (len(p) - 1) * top_k + p[-1]
    slot_of_prompt = {}
    for offset, (c, j, e) in enumerate(prompt_slots):
        s = num_nodes + offset
        slot_of_prompt[(c, j, e)] = s
        slot_kind[s] = PROMPT
        prompt_index[s] = j * n + e
        position_offsets[s] = len(nodes[c]) + j + 1  # prompt token j (0-based) of a depth-d node sits at d+j+1
        node_prompt_slots[c, j, e] = s
        slot_node[s] = c
        attend[s, :num_nodes] = ancestors[c]  # the node and its ancestors
        for jj in range(j + 1):  # earlier prompt tokens of the same chain and copy, and itself
            attend[s, slot_of_prompt[(c, jj, e)]] = True

    node_path = torch.zeros(num_nodes, depth_pad + 1, dtype=torch.long)
    for i, p in enumerate(nodes):
        chain = [node_of[p[:d]] for d in range(len(p) + 1)]
        node_path[i] = torch.tensor(chain + [i] * (depth_pad + 1 - len(chain)))

    return TreeBuffers(
        attend=attend,
        position_offsets=position_offsets,
        slot_kind=slot_kind,
        guess_index=guess_index,
        prompt_index=prompt_index,
        node_parent=torch.tensor([node_of[p[:-1]] if p else 0 for p in nodes], dtype=torch.long),
        node_depth=torch.tensor([len(p) for p in nodes], dtype=torch.long),
        node_valid=torch.ones(num_nodes, dtype=torch.bool),
        ancestor_or_self=ancestors,
        node_path=node_path,
        node_prompt_slots=node_prompt_slots,
        node_prompt_count=torch.tensor(tree.prompt_counts, dtype=torch.long),
        slot_node=slot_node,
        internal_nodes=torch.tensor(sorted({node_of[p[:-1]] for p in tree.paths}), dtype=torch.long),
    )


class StepSizes(NamedTuple):
    """A step's sizes, known on the host: the largest of each over the trees of the rows' depth states."""

    slots: int  # N: slots per row
    nodes: int  # C: nodes per row, the root included
    depth: int  # D: deepest path
    prompts: int  # m: the most prompt tokens attached to one node (the next step's guesses per row)
    internal: int  # I: nodes with children (early pruning reads their heads)

    def max(self, other: StepSizes) -> StepSizes:
        return StepSizes(*map(max, self, other))


@dataclass(frozen=True)
class TreeSetBuffers:
    """Every state's buffers padded to common sizes and stacked on a leading state axis [k+1, ...].

    Padding sits at the end of each axis, so a step whose rows need at most N slots and C+1 nodes slices
    ``[:, :N]`` / ``[:, :C+1]``. Padded slots attend only to themselves; padded nodes are never valid.
    ``state_sizes`` are each state's tree sizes on the host, so that a step's shapes never read the device.
    """

    tree_set: TreeSet
    n: int
    stacked: TreeBuffers  # every field with a leading [k+1] axis
    state_sizes: tuple[StepSizes, ...]  # [k+1]

    def sizes(self, states: Iterable[int]) -> StepSizes:
        """The sizes of a step over rows in these depth states (host ints)."""
        out = None
        for s in set(states):
            out = self.state_sizes[s] if out is None else out.max(self.state_sizes[s])
        assert out is not None, "a step has at least one row"
        return out

    @property
    def widest(self) -> StepSizes:
        """The sizes of a step that fits rows in any state: the fixed shape of a captured step."""
        return self.sizes(range(len(self.state_sizes)))


def _pad_to(t: torch.Tensor, shape: Sequence[int], fill) -> torch.Tensor:
    out = torch.full(tuple(shape), fill, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _tree_set_buffers_cpu(tree_set: TreeSet, n: int) -> TreeSetBuffers:
    depth = max(t.depth for t in tree_set.trees)
    per_state = [tree_buffers(t, k=tree_set.k, top_k=tree_set.top_k, n=n, max_depth=depth) for t in tree_set.trees]
    n_slots = max(b.attend.shape[0] for b in per_state)
    n_nodes = max(b.node_depth.shape[0] for b in per_state)
    n_internal = max(b.internal_nodes.shape[0] for b in per_state)
    k = tree_set.k

    def stack(name: str, shape: Sequence[int], fill) -> torch.Tensor:
        return torch.stack([_pad_to(getattr(b, name), shape, fill) for b in per_state])

    attend = stack("attend", (n_slots, n_slots), False)
    ancestors = stack("ancestor_or_self", (n_nodes, n_nodes), False)
    eye_slots, eye_nodes = torch.eye(n_slots, dtype=torch.bool), torch.eye(n_nodes, dtype=torch.bool)
    attend |= eye_slots  # padded slots see themselves, so no attention row is empty
    ancestors |= eye_nodes
    stacked = TreeBuffers(
        attend=attend,
        position_offsets=stack("position_offsets", (n_slots,), 0),
        slot_kind=stack("slot_kind", (n_slots,), PAD),
        guess_index=stack("guess_index", (n_slots,), 0),
        prompt_index=stack("prompt_index", (n_slots,), 0),
        node_parent=stack("node_parent", (n_nodes,), 0),
        node_depth=stack("node_depth", (n_nodes,), 0),
        node_valid=stack("node_valid", (n_nodes,), False),
        ancestor_or_self=ancestors,
        node_path=stack("node_path", (n_nodes, depth + 1), 0),
        node_prompt_slots=stack("node_prompt_slots", (n_nodes, k, n), 0),
        node_prompt_count=stack("node_prompt_count", (n_nodes,), 0),
        slot_node=stack("slot_node", (n_slots,), 0),
        internal_nodes=stack("internal_nodes", (n_internal,), 0),
    )
    sizes = tuple(StepSizes(slots=b.attend.shape[0], nodes=b.node_depth.shape[0], depth=t.depth,
                            prompts=max(t.prompt_counts, default=0), internal=b.internal_nodes.shape[0])
                  for b, t in zip(per_state, tree_set.trees))
    return TreeSetBuffers(tree_set=tree_set, n=n, stacked=stacked, state_sizes=sizes)


# Every tree set's buffers that anything still holds (a decoder, a captured graph), by (tree set, n, device):
# a lookup finds the very tensors a live graph reads, however many sets came and went since. The RECENT ones
# are also held here, so switching back to a set used lately costs nothing.
_LIVE: weakref.WeakValueDictionary[tuple[TreeSet, int, str], TreeSetBuffers] = weakref.WeakValueDictionary()
_RECENT: OrderedDict[tuple[TreeSet, int, str], TreeSetBuffers] = OrderedDict()
RECENT_BUFFERS = 64
_LOCK = threading.Lock()  # the decode loop and an adaptation's thread both look sets up


def tree_set_buffers(tree_set: TreeSet, n: int = 1, device: torch.device | str = "cpu") -> TreeSetBuffers:
    """Per (tree set, ensemble size, device), one object for as long as anything holds it (never two copies of a
    set's buffers at different addresses while a graph reads one); moved to ``device`` (the tensors are small)."""
    key = (tree_set, n, str(torch.device(device)))
    with _LOCK:
        buffers = _LIVE.get(key)
        if buffers is None:
            cpu = _LIVE.get((tree_set, n, "cpu")) or _tree_set_buffers_cpu(tree_set, n)
            if torch.device(device).type == "cpu":
                buffers = cpu
            else:
                moved = TreeBuffers(**{f: getattr(cpu.stacked, f).to(device) for f in TreeBuffers.__dataclass_fields__})
                buffers = TreeSetBuffers(tree_set=tree_set, n=n, stacked=moved, state_sizes=cpu.state_sizes)
            _LIVE[key] = buffers
        _RECENT[key] = buffers
        _RECENT.move_to_end(key)
        while len(_RECENT) > RECENT_BUFFERS:
            _RECENT.popitem(last=False)
    return buffers
