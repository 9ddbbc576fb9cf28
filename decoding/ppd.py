"""Batched Parallel Prompt Decoding, greedy and lossless.

Each step, for every active row, one forward pass over the row's tree: the root (last emitted token), the
candidate nodes (guessed by the prompt tokens of the previous step) and the prompt tokens attached to the
nodes. Verification accepts the longest chain of candidates that equal the model's own argmax at their
parent; the row emits those tokens plus the argmax at the deepest accepted node (the bonus token, next root).
The prompt tokens of that node guess the next step's candidates; their count is the next depth state.
Each row decodes in a slot of a fixed-shape KV cache (decoding/slot_cache.py): the step writes its tree at
the row's KV length, then moves the KV of the root and the accepted candidates to sit right there; the rest
is scratch that the next step overwrites. A step of root-only trees (plain decoding) moves nothing.

Rows are ragged (own prompt length, own KV length, own depth state); each uses its own state's tree, padded
to the widest tree in the step. Rows join and leave the batch between steps (decoding/slots.py).

A row with sampling parameters is verified by walking its tree with the draws plain sampling would make
(decoding/sampling.py): its output is plain sampling's for the same seed, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from decoding.batch import StopCheck, at_least_fp32, embedding_weight
from decoding.prompt_tokens import PromptTokens
from decoding.protocol import ActiveView, Decoder, StepOutput, StepPlan, StepReport
from decoding.pruning import (
    Compaction,
    PruneHead,
    check_splittable,
    compact,
    compacted_attend,
    kept_nodes,
    run_layers,
)
from decoding.results import RowResult
from decoding.sampling import SamplingParams
from decoding.slot_cache import SlotCache, step_mask
from decoding.slots import generate as generate_in_slots
from decoding.tree import (
    CANDIDATE,
    PAD,
    PROMPT,
    StepSizes,
    TreeSet,
    TreeSetBuffers,
    default_tree_set,
    on_whole_root_path,
    tree_set_buffers,
)
from decoding.vanilla import root_only_step


class TreeForward(NamedTuple):
    """A tree forward's outputs: slot token ids [A, N] (a prompt slot holds the root, unused), hidden states
    [A, N, H], and with early pruning the kept nodes [A, C] and the later layers' ``Compaction`` (pruned slots'
    hidden states are zeros); else None for both."""

    ids: torch.Tensor
    hidden: torch.Tensor
    kept: torch.Tensor | None = None
    compaction: Compaction | None = None


class Verified(NamedTuple):
    """Verification's outcome per row: the deepest accepted node [B], the emitted tokens [B, D+1] (the accepted
    candidates, then the bonus token at index ``accepted``), the accepted candidates' count [B], and the accepted
    path's slots [B, D+1] (root first, padded with the best node)."""

    best: torch.Tensor
    tokens: torch.Tensor
    accepted: torch.Tensor
    path: torch.Tensor


class PPDDecoder(Decoder):
    """``prune_head``: ProPD early pruning (decoding/pruning.py); None runs every slot through every layer.

    ``merged_logits_rows``: a step over at most this many slots in all (batch x slots) runs the lm_head once,
    over every slot, instead of over the nodes and then the best node's prompt slots (see ``step``).

    ``passes`` and ``tokens_processed`` count the tree forwards and their input tokens (batch x slots, averaged
    over layers when pruning ran the later layers on fewer slots), for benchmarks."""

    def __init__(self, model: PreTrainedModel, prompt_tokens: PromptTokens, tree_set: TreeSet | None = None,
                 eos_token_ids: Sequence[int] = (), prune_head: PruneHead | None = None,
                 merged_logits_rows: int = 32):
        self.model = model
        self.merged_logits_rows = merged_logits_rows
        self.prompt_tokens = prompt_tokens
        self.tree_set = tree_set or default_tree_set(k=prompt_tokens.k)
        if self.tree_set.k != prompt_tokens.k:
            raise ValueError(f"tree set is for k={self.tree_set.k} prompt tokens, the prompt tokens have "
                             f"k={prompt_tokens.k}")
        if prompt_tokens.hidden_size != model.config.hidden_size:
            raise ValueError(f"prompt tokens have hidden size {prompt_tokens.hidden_size}, the model "
                             f"{model.config.hidden_size}: they were made for another model")
        self.eos_token_ids = list(eos_token_ids)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.prune_head = prune_head
        if prune_head is not None:
            check_splittable(self.decoder, prune_head)
        self.passes, self.tokens_processed = 0, 0.0
        self.buffers = tree_set_buffers(self.tree_set, prompt_tokens.n, self.device)
        # [k*n, H], the decoder's own storage, allocated once: adopt_prompt_tokens overwrites it in place, so a
        # compiled or captured step never reads a stale address
        self.prompt_table = prompt_tokens.flat(self.dtype).detach().clone()

    @property
    def device(self) -> torch.device:
        return embedding_weight(self.model).device

    @property
    def dtype(self) -> torch.dtype:
        return embedding_weight(self.model).dtype

    @property
    def varies_shape(self) -> bool:
        return self.prune_head is not None

    @property
    def k(self) -> int:
        return self.prompt_tokens.k

    @property
    def top_k(self) -> int:
        return self.tree_set.top_k

    @property
    def max_step_tokens(self) -> int:
        """The most slots a step may put into a row's KV (its widest tree; the buffers are cached per tree set)."""
        return tree_set_buffers(self.tree_set, self.prompt_tokens.n).widest.slots

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sequence[SamplingParams] | None = None,
                 stop: Sequence[StopCheck | None] | None = None) -> list[RowResult]:
        """``sampling``: per-row parameters (None: all greedy); ``stop``: per-row stop checks (stop strings)."""
        return generate_in_slots(self, prompts, max_new_tokens, sampling, stop)

    def accept_sampled(self, node_tokens, node_parent, node_valid, logits_at, draw, max_depth):
        """Sampled verification with the step's draw (decoding/draws.py); a method so that a test can put a wrong
        scheme in its place and see the statistical tests catch it."""
        return draw.accept(node_tokens, node_parent, node_valid, logits_at, max_depth)

    def adopt_prompt_tokens(self, prompt_tokens: PromptTokens) -> None:
        """Decode with ``prompt_tokens`` from the next step on. The prompt-token table is overwritten in place
        (same shape, same storage), so a compiled or captured step that reads it stays valid. Rows in flight keep
        the guesses they hold: a guess only decides how many tokens a step may accept, never which."""
        self.check_adoptable(prompt_tokens)
        self.prompt_tokens = prompt_tokens
        with torch.inference_mode():  # the table may have been made in inference mode
            self.prompt_table.copy_(prompt_tokens.flat(self.dtype))

    def check_adoptable(self, prompt_tokens: PromptTokens) -> None:
        """Raise ValueError unless ``adopt_prompt_tokens`` can take these prompt tokens (the same shape)."""
        old = self.prompt_tokens
        if (prompt_tokens.k, prompt_tokens.n, prompt_tokens.hidden_size) != (old.k, old.n, old.hidden_size):
            raise ValueError(f"new prompt tokens are [{prompt_tokens.k}, {prompt_tokens.n}, "
                             f"{prompt_tokens.hidden_size}], the decoder's [{old.k}, {old.n}, {old.hidden_size}]")

    def use_tree_set(self, tree_set: TreeSet) -> None:
        """Decode with ``tree_set`` from the next step on (rows keep their depth states: same k)."""
        if (tree_set.k, tree_set.top_k) != (self.tree_set.k, self.tree_set.top_k):
            raise ValueError("a new tree set must keep k and top_k (the slots' guesses are shaped by them)")
        self.tree_set = tree_set
        self.buffers = tree_set_buffers(tree_set, self.prompt_tokens.n, self.device)

    # The decoder protocol (decoding/protocol.py). ProPD (decoding/propd.py) changes the tree between steps here.
    def plan_step(self, rows: ActiveView | None) -> StepPlan:
        """The tree of the next step, for the rows in slots 0..A-1 (``rows``, host only; None: any rows)."""
        return self.plan_for(self.buffers, rows)

    @staticmethod
    def plan_for(buffers: TreeSetBuffers, rows: ActiveView | None) -> StepPlan:
        """A step of ``buffers``' tree set, sized to ``rows``' depth states (None: at its widest)."""
        return StepPlan(buffers, buffers.widest if rows is None else buffers.sizes(rows.states), buffers.widest)

    def finish_step(self, plan: StepPlan, report: StepReport) -> None:
        """Counts the step's tree forward and its input tokens (batch x slots; a pruned step's later layers ran
        ``late_width`` slots per row)."""
        self.passes += 1
        slots = report.sizes.slots
        if report.late_width is None:
            self.tokens_processed += report.run * slots
        else:
            assert self.prune_head is not None, "only a pruned step has a late width"
            layers, early = len(self.decoder.layers), self.prune_head.layer
            self.tokens_processed += report.run * (early * slots + (layers - early) * report.late_width) / layers

    # -- the step, in its parts: forward, verify, propose, compact -------------------------------------------------
    def step(self, cache: SlotCache, buffers: TreeSetBuffers, kv_len: torch.Tensor, root: torch.Tensor,
             guesses: torch.Tensor, state: torch.Tensor, draw=None, *, sizes: StepSizes, view: int) -> StepOutput:
        """One guess-and-verify pass over slots 0..A-1. kv_len, root, state [A] long, guesses [A, k, top_k];
        ``sizes``: the step's sizes, at least those of the rows' trees (a fixed-shape step passes the tree set's
        widest); ``view``: the KV columns attention reads, at least the longest row plus ``sizes.slots``.
        ``draw``: None for greedy verification, else the step's draw (decoding/draws.py). Without pruning and
        greedy, nothing reads the device.

        Returns a ``StepOutput``: row b emits ``tokens[b, :counts[b]]``, and the KV of its root and accepted
        candidates now sits at columns kv_len[b] .. kv_len[b] + counts[b] - 1 (the caller advances kv_len by
        counts); its next guesses are [k, top_k], of which its next state says how many are real.
        """
        if buffers.tree_set.root_only:
            return root_only_step(self.decoder, self.lm_head, cache, kv_len, root, guesses, draw, view)
        tree = self.forward(cache, buffers, kv_len, root, guesses, state, sizes, view)
        # The lm_head reads its whole weight (V x H, 113 MB for the default model in float32) in every call, and
        # over a few rows that read is most of its cost: one call over all the slots then costs about what a
        # call over the nodes alone does, and saves a second read for the best node's prompt slots (a batch-1
        # 8-slot step on the 2-core CPU: 2 x ~9 ms against ~9 ms). Over more rows, the slots never read would
        # cost more than the read saved.
        A, N = tree.ids.shape
        slot_logits = self.logits(tree.hidden) if A * N <= self.merged_logits_rows else None  # [A, N, V] or None
        verified = self.verify(buffers, state, tree, slot_logits, sizes, draw)
        next_guesses, next_state = self.propose(buffers, state, verified.best, tree.hidden, slot_logits, sizes)
        self.compact(cache, kv_len, verified.path, tree.compaction)
        late_width = None if tree.compaction is None else tree.compaction.width
        bonus = verified.tokens.gather(1, verified.accepted[:, None]).squeeze(1)  # [A]: the next root
        return StepOutput(verified.tokens, verified.accepted + 1, bonus, next_guesses, next_state, late_width)

    def forward(self, cache: SlotCache, buffers: TreeSetBuffers, kv_len, root, guesses, state, sizes: StepSizes,
                view: int) -> TreeForward:
        """Run every row's tree through the model, its N slots written at columns kv_len[b].. of its slot: row b
        uses the tree of its depth state ``state[b]``, padded to ``sizes.slots`` (N, at least the widest tree
        among the rows). Prompt slots take the prompt-token embeddings."""
        sb = buffers.stacked
        N = sizes.slots
        kind = sb.slot_kind[state, :N]  # [A, N]
        cand = guesses.flatten(1).gather(1, sb.guess_index[state, :N])  # [A, N]
        ids = torch.where(kind == CANDIDATE, cand, root[:, None])  # [A, N]
        embeds = self.embed(ids)  # [A, N, H]
        prompt_embeds = self.prompt_table[sb.prompt_index[state, :N]]  # [A, N, H]
        embeds = torch.where((kind == PROMPT)[..., None], prompt_embeds, embeds)
        positions = kv_len[:, None] + sb.position_offsets[state, :N]  # [A, N]
        attend = sb.attend[state, :N, :N]  # [A, N, N]
        mask = step_mask(kv_len, attend, view, embeds.dtype)  # [A, 1, N, view]
        cache.for_step(kv_len, view)
        if self.prune_head is None or sizes.internal == 0:  # pruning needs candidates
            hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=True).last_hidden_state  # [A, N, H]
            return TreeForward(ids, hidden)
        return self._forward_pruned(cache, buffers, state, sizes, ids, embeds, positions, attend, mask, kv_len, view)

    def _forward_pruned(self, cache, buffers, state, sizes, ids, embeds, positions, attend, mask, kv_len,
                        view) -> TreeForward:
        """The tree forward with early pruning: layers [0, L) over every slot, the prune head on the NI internal
        nodes, then layers [L, end) over the surviving slots only (see decoding/pruning.py). Those write their
        N' slots at columns kv_len[b].. of their own layers."""
        sb, head = buffers.stacked, self.prune_head
        assert head is not None
        A, N, H = embeds.shape
        C, NI = sizes.nodes, sizes.internal
        early = run_layers(self.decoder, embeds, mask, positions, cache, slice(0, head.layer))  # [A, N, H]
        internal = sb.internal_nodes[state, :NI]  # [A, NI] node slots (nodes lead every tree)
        at_internal = early.gather(1, internal[..., None].expand(-1, -1, H))  # [A, NI, H]
        top = head(at_internal, self.decoder.norm, self.lm_head).topk(head.keep_top_k, dim=-1).indices  # [A, NI, K]
        node_top = top.new_full((A, C, head.keep_top_k), -1)  # [A, C, K]: leaves predict nothing
        node_top.scatter_(1, internal[..., None].expand(-1, -1, head.keep_top_k), top)
        kept = kept_nodes(ids[:, :C], node_top, sb.node_parent[state, :C], sb.node_valid[state, :C],
                          sb.ancestor_or_self[state, :C, :C])  # [A, C]
        slot_node = sb.slot_node[state, :N]  # [A, N]
        keep = kept.gather(1, slot_node) & (sb.slot_kind[state, :N] != PAD)  # [A, N]: a slot's node is < C
        c = compact(keep)
        late_in = early.gather(1, c.order[..., None].expand(-1, -1, H))  # [A, N', H]
        late_mask = step_mask(kv_len, compacted_attend(attend, c), view, embeds.dtype)  # [A, 1, N', view]
        late = run_layers(self.decoder, late_in, late_mask, positions.gather(1, c.order), cache,
                          slice(head.layer, None))
        late = self.decoder.norm(late)  # [A, N', H]
        hidden = late.new_zeros(A, N, H).scatter_(1, c.order[..., None].expand(-1, -1, H), late)  # [A, N, H]
        return TreeForward(ids, hidden, kept, c)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V], as one 2D matmul. A strided 3D input (the tree's leading slots,
        hidden[:, :C]) is not folded to 2D by the linear layer, and on a CPU costs 5-8x as much (measured: batch
        16, 3 of 5 slots, 169 ms against 22 ms; 14% of a batch-16 run of an 8-slot tree)."""
        V = self.lm_head.weight.shape[0]
        return self.lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], V)

    def verify(self, buffers: TreeSetBuffers, state, tree: TreeForward, slot_logits: torch.Tensor | None,
               sizes: StepSizes, draw) -> Verified:
        """Accept each row's longest chain of candidates that the model's argmax (greedy) or its draws (sampled)
        agree with. Nodes are the leading C slots of every tree; pruned nodes are not valid: never accepted."""
        sb = buffers.stacked
        C, D = sizes.nodes, sizes.depth  # most nodes (root included) and deepest path among the rows' trees
        valid = sb.node_valid[state, :C] if tree.kept is None else sb.node_valid[state, :C] & tree.kept  # [B, C]
        if draw is None:
            node_logits = self.logits(tree.hidden[:, :C]) if slot_logits is None else slot_logits[:, :C]  # [B, C, V]
            return verify_greedy(tree.ids[:, :C], node_logits.argmax(-1), sb.node_parent[state, :C], valid,
                                 sb.ancestor_or_self[state, :C, :C], sb.node_depth[state, :C],
                                 sb.node_path[state, :C, : D + 1])

        def logits_at(node: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [R], [R] -> logits [R, V]
            return self.logits(tree.hidden[rows, node]) if slot_logits is None else slot_logits[rows, node]

        best, tokens, accepted = self.accept_sampled(tree.ids[:, :C], sb.node_parent[state, :C], valid, logits_at,
                                                     draw, D)  # [B], [B, D+1], [B]
        return Verified(best, tokens, accepted, sb.node_path[state, best, : D + 1])

    def propose(self, buffers: TreeSetBuffers, state, best: torch.Tensor, hidden: torch.Tensor,
                slot_logits: torch.Tensor | None, sizes: StepSizes) -> tuple[torch.Tensor, torch.Tensor]:
        """The next guesses [B, k, top_k] and next depth state [B]: the top_k tokens of the prompt tokens attached
        to each row's deepest accepted node ``best`` [B], ensemble copies' logits averaged. Only the first m
        prompt tokens are ever read (m = most attached to any node of the rows' trees): unless the slots'
        logits are at hand, the lm_head runs on those only. Slots past a node's count point at slot 0; their
        guesses are never used (the next state forbids it)."""
        sb = buffers.stacked
        B, H = hidden.shape[0], hidden.shape[-1]
        m = sizes.prompts
        slots = sb.node_prompt_slots[state, best][:, :m]  # [B, m, n]
        n, V = slots.shape[2], self.lm_head.weight.shape[0]
        if slot_logits is None:
            prompt_hidden = hidden.gather(1, slots.reshape(B, -1, 1).expand(-1, -1, H))  # [B, m*n, H]
            prompt_slot_logits = self.logits(prompt_hidden)  # [B, m*n, V]
        else:
            prompt_slot_logits = slot_logits.gather(1, slots.reshape(B, -1, 1).expand(-1, -1, V))  # [B, m*n, V]
        prompt_logits = at_least_fp32(prompt_slot_logits).view(B, m, n, V).mean(2)  # [B, m, V]
        next_guesses = top_k_guesses(prompt_logits, self.prompt_tokens.k, self.tree_set.top_k)  # [B, k, top_k]
        return next_guesses, sb.node_prompt_count[state, best]

    def compact(self, cache: SlotCache, kv_len: torch.Tensor, path: torch.Tensor,
                compaction: Compaction | None) -> None:
        """Keep the KV of the root and the accepted candidates only: the path's columns (``path`` [A, D+1] slots,
        root first) move to kv_len[b].. (the root's is there already); the rest is scratch. A step whose rows'
        trees are all the root alone (D = 0) moves nothing. With pruning, the later layers hold the survivors
        only, compacted: the path's slots sit elsewhere there."""
        D1 = path.shape[1]
        if D1 == 1:
            return
        dst = kv_len[:, None] + torch.arange(D1, device=kv_len.device)  # [A, D+1]
        if compaction is None:
            cache.move_columns(src=kv_len[:, None] + path, dst=dst)
            return
        assert self.prune_head is not None, "only a pruned step compacts its later layers"
        L = self.prune_head.layer
        cols = min(D1, compaction.width)  # every accepted path survived, so it fits in its row's survivors
        cache.move_columns(src=kv_len[:, None] + path[:, :cols], dst=dst[:, :cols], layers=slice(0, L))
        cache.move_columns(src=kv_len[:, None] + compaction.position.gather(1, path[:, :cols]), dst=dst[:, :cols],
                           layers=slice(L, None))


def top_k_guesses(prompt_logits: torch.Tensor, k: int, top_k: int) -> torch.Tensor:
    """Next step's candidates from the first m prompt tokens' logits [B, m, V]: their top_k tokens, as
    [B, k, top_k] (zeros past m)."""
    B, m, _ = prompt_logits.shape
    guesses = torch.zeros(B, k, top_k, dtype=torch.long, device=prompt_logits.device)
    if m:
        guesses[:, :m] = prompt_logits.topk(top_k, dim=-1).indices
    return guesses


def verify_greedy(node_tokens: torch.Tensor, node_argmax: torch.Tensor, node_parent: torch.Tensor,
                  node_valid: torch.Tensor, ancestor_or_self: torch.Tensor, node_depth: torch.Tensor,
                  node_path: torch.Tensor) -> Verified:
    """Greedy verification of B trees of C nodes: ``greedy_accept``'s deepest accepted node, then the tokens the
    row emits, its accepted candidates followed by the argmax there (the bonus token), padded with it to D+1.
    node_path [B, C, D+1]: each node's root path in slots, root first, padded with the node itself."""
    best = greedy_accept(node_tokens, node_argmax, node_parent, node_valid, ancestor_or_self, node_depth)  # [B]
    accepted = node_depth.gather(1, best[:, None]).squeeze(1)  # [B]
    bonus = node_argmax.gather(1, best[:, None])  # [B, 1]
    path = node_path.gather(1, best[:, None, None].expand(-1, 1, node_path.shape[2])).squeeze(1)  # [B, D+1]
    tokens = torch.cat([node_tokens.gather(1, path)[:, 1:], bonus], 1)  # [B, D+1]
    tokens.scatter_(1, accepted[:, None], bonus)  # emitted: accepted candidates, then the bonus token
    return Verified(best, tokens, accepted, path)


def greedy_accept(node_tokens: torch.Tensor, node_argmax: torch.Tensor, node_parent: torch.Tensor,
                  node_valid: torch.Tensor, ancestor_or_self: torch.Tensor, node_depth: torch.Tensor) -> torch.Tensor:
    """Greedy verification: the deepest node whose whole root path matches the model's argmax.

    node_tokens [B, C]: the token each node holds (node 0 is the root); node_argmax [B, C]: the model's argmax
    at each node; node_parent, node_depth [B, C] long; node_valid [B, C] bool; ancestor_or_self [B, C, C] bool.
    A candidate is accepted when it equals the argmax at its parent and its parent is accepted. Returns the
    index of the deepest accepted node [B] (0, the root, when nothing is accepted).
    """
    parent_argmax = node_argmax.gather(1, node_parent)  # [B, C]
    match = (node_tokens == parent_argmax) & node_valid  # [B, C]
    match[:, 0] = True  # the root is already committed
    accepted = on_whole_root_path(match, ancestor_or_self)  # [B, C]: the node and all its ancestors match
    # Accepted nodes form one chain (siblings hold distinct tokens), so the deepest is unique.
    return torch.where(accepted, node_depth, -1).argmax(-1)  # [B]
