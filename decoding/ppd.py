"""Batched Parallel Prompt Decoding, greedy and lossless.

Each step, for every active row, one forward pass over the row's tree: the root (last emitted token), the
candidate nodes (guessed by the prompt tokens of the previous step) and the prompt tokens attached to the
nodes. Verification accepts the longest chain of candidates that equal the model's own argmax at their
parent; the row emits those tokens plus the argmax at the deepest accepted node (the bonus token, next root).
The prompt tokens of that node guess the next step's candidates; their count is the next depth state.
Only the KV of the root and the accepted candidates is kept, moved to sit right after the row's last kept
column; a step of root-only trees (plain decoding) moves nothing (decoding/batch.RowKV).

Rows are ragged (own prompt length, own KV length, own depth state); each uses its own state's tree, padded
to the widest tree in the step.

A row with sampling parameters is verified by walking its tree with the draws plain sampling would make
(decoding/sampling.py): its output is plain sampling's for the same seed, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from decoding.batch import (ActiveRows, RowKV, StopCheck, additive_mask, at_least_fp32, check_prompts, move_kv,
                            new_cache, one_token_forward, pad_prompts, prefill, shared_prompts)
from decoding.prompt_tokens import PromptTokens
from decoding.pruning import PruneHead, check_splittable, compact, compacted_mask, kept_nodes, run_layers
from decoding.results import RowResult
from decoding.sampling import RowSampler, SamplingParams, sample_accept
from decoding.tree import CANDIDATE, PAD, PROMPT, TreeSet, default_tree_set, on_whole_root_path, tree_set_buffers


class PPDDecoder:
    """``prune_head``: ProPD early pruning (decoding/pruning.py); None runs every slot through every layer.

    ``merged_logits_rows``: a step over at most this many slots in all (batch x slots) runs the lm_head once,
    over every slot, instead of over the nodes and then the best node's prompt slots (see ``step``).

    ``passes`` and ``tokens_processed`` count the tree forwards and their input tokens (batch x slots, averaged
    over layers when pruning ran the later layers on fewer slots), for benchmarks."""

    def __init__(self, model: nn.Module, prompt_tokens: PromptTokens, tree_set: TreeSet | None = None,
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

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: Sequence[SamplingParams] | None = None,
                 stop: Sequence[StopCheck | None] | None = None) -> list[RowResult]:
        """``sampling``: per-row parameters (None: all greedy); ``stop``: per-row stop checks (stop strings)."""
        check_prompts(prompts)
        device, dtype = self.device, self.embed.weight.dtype
        rows = ActiveRows(len(prompts), max_new_tokens, self.eos_token_ids, device, stop)
        if rows.size == 0:
            return rows.results
        # Draws below a row's last allowed token are made and thrown away: k uniforms of lookahead.
        sampler = RowSampler.for_rows(sampling, rows.limits, self.prompt_tokens.k, device)  # None: greedy
        active = [prompts[i] for i in rows.index.tolist()]
        cache = new_cache(self.model)
        # Each row's last prompt token is its first root. The first step carries the rest of the prompts: they
        # ride in the same forward as the first tree (root + k prompt tokens). Completions of one prompt
        # instead share one prefill of it, its KV copied to each (then the first step is a tree like any).
        if shared_prompts(active) is None:
            prefix = pad_prompts([p[:-1] for p in active], device)
            kv = RowKV.right_padded(prefix[1])  # the prefix's columns, written by the first step
        else:
            prefix = None
            kv = RowKV.right_padded(prefill(self.model, cache, [p[:-1] for p in active], device)[0])
        root = torch.tensor([p[-1] for p in active], dtype=torch.long, device=device)  # [B]
        ts = self.tree_set
        guesses = torch.zeros(rows.size, ts.k, ts.top_k, dtype=torch.long, device=device)  # [B, k, top_k]
        state = torch.zeros(rows.size, dtype=torch.long, device=device)  # [B]: no guesses yet
        prompt_table = self.prompt_tokens.flat(dtype)  # [k*n, H]
        self._start()
        first_step = True

        while rows.size > 0:
            buffers = self._buffers_for_step(rows, kv.length, state)
            draw = None if sampler is None else self._drawer(sampler, rows.index, rows.emitted())
            tokens, counts, root, prompt_logits, state, kv = self.step(
                cache, buffers, prompt_table, kv, root, guesses, state, prefix, draw)
            keep = rows.commit(tokens, counts)  # syncs the device: the step is done
            self._after_commit(rows, keep, first_step=first_step)
            prefix, first_step = None, False
            root, prompt_logits, state, *kv = rows.drop_finished(keep, cache, root, prompt_logits, state, *kv)
            if rows.size:
                kv = RowKV(*kv).cropped(cache)
                guesses = self.propose(prompt_logits, rows)
                self._after_propose(rows, guesses, state)
        return rows.results

    @staticmethod
    def _drawer(sampler: RowSampler, index: torch.Tensor, emitted: torch.Tensor):
        """draw(logits [R, V], depth, rows [R]) for this step: batch rows' tokens at new-token position
        emitted + depth."""
        return lambda logits, depth, rows: sampler.draw(logits, index[rows], emitted[rows] + depth)

    def accept_sampled(self, node_tokens, node_parent, node_valid, logits_at, draw, max_depth):
        """Sampled verification (decoding/sampling.sample_accept); a method so that a test can put a wrong
        scheme in its place and see the statistical tests catch it."""
        return sample_accept(node_tokens, node_parent, node_valid, logits_at, draw, max_depth)

    # Hooks for decoders that change the tree between steps (decoding/propd.py); a plain PPDDecoder keeps one.
    def _start(self) -> None:
        """A new generate() call begins."""
        self._buffers = tree_set_buffers(self.tree_set, self.prompt_tokens.n, self.device)

    def _buffers_for_step(self, rows: ActiveRows, kv_len: torch.Tensor, state: torch.Tensor):
        """The tree buffers of the next step, for the rows now active (KV lengths, depth states: [B])."""
        return self._buffers

    def _after_commit(self, rows: ActiveRows, keep: torch.Tensor, first_step: bool) -> None:
        """The step's tokens are committed; ``keep`` [B] marks the rows still decoding (not yet dropped)."""

    def _after_propose(self, rows: ActiveRows, guesses: torch.Tensor, state: torch.Tensor) -> None:
        """The surviving rows have their next guesses [B, k, top_k] and depth states [B]."""

    def propose(self, prompt_logits: torch.Tensor, rows: ActiveRows) -> torch.Tensor:
        """Next step's candidates from the first m prompt tokens' logits [B, m, V]: their top_k tokens, as
        [B, k, top_k] (zeros past m: no row's next tree reads them).

        Called after the step's tokens are committed; ``rows`` says which input row each batch entry is.
        """
        B, m, _ = prompt_logits.shape
        top_k = self.tree_set.top_k
        guesses = torch.zeros(B, self.prompt_tokens.k, top_k, dtype=torch.long, device=prompt_logits.device)
        if m:
            guesses[:, :m] = prompt_logits.topk(top_k, dim=-1).indices
        return guesses

    def _forward_tree(self, cache, buffers, prompt_table, kv: RowKV, root, guesses, state, prefix=None):
        """Run every row's tree through the model.

        Returns (slot token ids [B, N], hidden states [B, N, H], pruning): row b uses the tree of its depth state
        ``state[b]``, padded to the widest tree among the rows (N slots). Prompt slots take the prompt-token
        embeddings; their entry in the returned ids is the root (unused). ``prefix`` (from ``pad_prompts``: ids,
        valid, attend, positions over P columns) is run in the same forward, ahead of the trees, which see its
        valid columns: the prefill folded into the first step (``kv`` then holds the prefix's columns).
        ``pruning`` is None, or (kept nodes [B, C], the later layers' Compaction) when early pruning ran: pruned
        slots' hidden states are zeros.
        """
        sb = buffers.stacked
        N = int(buffers.num_slots[state].max())
        T = cache.get_seq_length()
        kind = sb.slot_kind[state, :N]  # [B, N]
        cand = guesses.flatten(1).gather(1, sb.guess_index[state, :N])  # [B, N]
        ids = torch.where(kind == CANDIDATE, cand, root[:, None])  # [B, N]
        embeds = self.embed(ids)  # [B, N, H]
        prompt_embeds = prompt_table[sb.prompt_index[state, :N]]  # [B, N, H]
        embeds = torch.where((kind == PROMPT)[..., None], prompt_embeds, embeds)
        positions = kv.length[:, None] + sb.position_offsets[state, :N]  # [B, N]
        attend = sb.attend[state, :N, :N]  # [B, N, N]
        B = ids.shape[0]
        if prefix is not None:
            assert T == 0, "the prefix is the prefill: the cache must be empty"
            pre_ids, pre_valid, pre_attend, pre_positions = prefix  # [B, P] ...
            P = pre_ids.shape[1]
            embeds = torch.cat([self.embed(pre_ids), embeds], 1)  # [B, P+N, H]
            positions = torch.cat([pre_positions, positions], 1)  # [B, P+N]
            attend = torch.cat([
                torch.cat([pre_attend, pre_attend.new_zeros(B, P, N)], 2),  # the prompt never sees the tree
                torch.cat([pre_valid[:, None, :].expand(B, N, P), attend], 2),  # the tree sees its row's prompt
            ], 1)  # [B, P+N, P+N]
        assert kv.valid.shape[1] == (T if prefix is None else P), "the rows' KV layout and the cache disagree"
        kv_valid = kv.valid[:, :T]  # [B, T]: none before the folded prefill (it brings its own)
        mask = additive_mask(kv_valid, attend, embeds.dtype)  # [B, 1, S, T+S]
        self.passes += 1
        # Pruning needs candidates to prune, and never meets the prefill (its trees are all in state 0).
        I = 0 if self.prune_head is None or prefix is not None else int(buffers.num_internal[state].max())
        if I == 0:
            hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=True).last_hidden_state  # [B, S, H]
            self.tokens_processed += B * N
            return ids, hidden[:, -N:], None
        return self._forward_pruned(cache, buffers, state, I, ids, embeds, positions, attend, mask, kv_valid)

    def _forward_pruned(self, cache, buffers, state, I, ids, embeds, positions, attend, mask, kv_valid):
        """The tree forward with early pruning: layers [0, L) over every slot, the prune head on the I internal
        nodes, then layers [L, end) over the surviving slots only (see decoding/pruning.py)."""
        sb, head = buffers.stacked, self.prune_head
        B, N, H = embeds.shape
        C = int(buffers.num_nodes[state].max())
        early = run_layers(self.decoder, embeds, mask, positions, cache, slice(0, head.layer))  # [B, N, H]
        internal = sb.internal_nodes[state, :I]  # [B, I] node slots (nodes lead every tree)
        at_internal = early.gather(1, internal[..., None].expand(-1, -1, H))  # [B, I, H]
        top = head(at_internal, self.decoder.norm, self.lm_head).topk(head.keep_top_k, dim=-1).indices  # [B, I, K]
        node_top = top.new_full((B, C, head.keep_top_k), -1)  # [B, C, K]: leaves predict nothing
        node_top.scatter_(1, internal[..., None].expand(-1, -1, head.keep_top_k), top)
        kept = kept_nodes(ids[:, :C], node_top, sb.node_parent[state, :C], sb.node_valid[state, :C],
                          sb.ancestor_or_self[state, :C, :C])  # [B, C]
        slot_node = sb.slot_node[state, :N]  # [B, N]
        keep = kept.gather(1, slot_node) & (sb.slot_kind[state, :N] != PAD)  # [B, N]: a slot's node is < C
        c = compact(keep)
        late_in = early.gather(1, c.order[..., None].expand(-1, -1, H))  # [B, N', H]
        late_mask = compacted_mask(attend, kv_valid, c, embeds.dtype)  # [B, 1, N', T+N']
        late = run_layers(self.decoder, late_in, late_mask, positions.gather(1, c.order), cache,
                          slice(head.layer, None))
        late = self.decoder.norm(late)  # [B, N', H]
        hidden = late.new_zeros(B, N, H).scatter_(1, c.order[..., None].expand(-1, -1, H), late)  # [B, N, H]
        layers = len(self.decoder.layers)
        self.tokens_processed += B * (head.layer * N + (layers - head.layer) * c.width) / layers
        return ids, hidden, (kept, c)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V], as one 2D matmul. A strided 3D input (the tree's leading slots,
        hidden[:, :C]) is not folded to 2D by the linear layer: on a CPU it then took 5-8x as long (batch 16,
        3 of 5 slots: 169 ms against 22 ms), 14% of a batch-16 run of an 8-slot tree."""
        V = self.lm_head.weight.shape[0]
        return self.lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], V)

    def step(self, cache, buffers, prompt_table, kv: RowKV, root, guesses, state, prefix=None, draw=None):
        """One guess-and-verify pass. ``draw``: None for greedy verification, else draw(logits [R, V], depth,
        rows [R]) gives batch rows' sampled tokens at a depth below the root (see ``_drawer``).

        Returns (tokens [B, D+1], counts [B], next root [B], prompt logits [B, m, V], next state [B], the rows'
        KV layout after the step): row b emits ``tokens[b, :counts[b]]``. The cache keeps the step's columns
        past the rows' ends; the caller crops them (``RowKV.cropped``) once finished rows are dropped.
        """
        if buffers.tree_set.root_only and prefix is None:
            return self._root_only_step(cache, kv, root, draw)
        sb = buffers.stacked
        B, H = root.shape[0], prompt_table.shape[-1]
        C = int(buffers.num_nodes[state].max())  # most nodes (root included) among the rows
        D = int(buffers.depth[state].max())  # deepest tree among the rows
        ids, hidden, pruning = self._forward_tree(cache, buffers, prompt_table, kv, root, guesses, state, prefix)
        N = hidden.shape[1]  # the widest tree's slots
        T = cache.get_seq_length() - N  # where this step's tree starts in the cache (layer 0 saw all)

        # The lm_head reads its whole weight (V x H, 113 MB for the default model in float32) in every call, and
        # over a few rows that read is most of its cost: one call over all the slots then costs about what a
        # call over the nodes alone does, and saves a second read for the best node's prompt slots (a batch-1
        # 8-slot step on the 2-core CPU: 2 x ~9 ms against ~9 ms). Over more rows, the slots never read would
        # cost more than the read saved.
        slot_logits = self.logits(hidden) if B * N <= self.merged_logits_rows else None  # [B, N, V] or None

        # Verify: nodes are the leading C slots of every tree. Pruned nodes are not valid: never accepted.
        valid = sb.node_valid[state, :C] if pruning is None else sb.node_valid[state, :C] & pruning[0]
        if draw is None:
            node_logits = self.logits(hidden[:, :C]) if slot_logits is None else slot_logits[:, :C]  # [B, C, V]
            node_argmax = node_logits.argmax(-1)  # [B, C]
            depth = sb.node_depth[state, :C]  # [B, C]
            best = greedy_accept(ids[:, :C], node_argmax, sb.node_parent[state, :C], valid,
                                 sb.ancestor_or_self[state, :C, :C], depth)  # [B]
            n_acc = depth.gather(1, best[:, None]).squeeze(1)  # [B] accepted candidates
            bonus = node_argmax.gather(1, best[:, None])  # [B, 1]
            path = sb.node_path[state, best, : D + 1]  # [B, D+1] slots, root first, padded with the best node
            tokens = torch.cat([ids.gather(1, path)[:, 1:], bonus], 1)  # [B, D+1]
            tokens.scatter_(1, n_acc[:, None], bonus)  # emitted: accepted candidates, then the bonus token
        else:
            def logits_at(node: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [R], [R] -> logits [R, V]
                return self.logits(hidden[rows, node]) if slot_logits is None else slot_logits[rows, node]

            best, tokens, n_acc = self.accept_sampled(ids[:, :C], sb.node_parent[state, :C], valid, logits_at,
                                                      draw, D)  # [B], [B, D+1], [B]
            path = sb.node_path[state, best, : D + 1]  # [B, D+1]
            bonus = tokens.gather(1, n_acc[:, None])  # [B, 1]: the draw at the deepest accepted node

        # Next guesses: the prompt tokens attached to the deepest accepted node, ensemble logits averaged.
        # Slots past a node's count point at slot 0; their logits are never used (the state forbids it).
        # Only the first m prompt tokens are ever read (m = most attached to any row's best node): unless the
        # slots' logits are at hand, the lm_head runs on those only (none when plain decoding).
        n_prompt = sb.node_prompt_count[state, best]  # [B]
        m = int(n_prompt.max())
        slots = sb.node_prompt_slots[state, best][:, :m]  # [B, m, n]
        n, V = slots.shape[2], self.lm_head.weight.shape[0]
        if slot_logits is None:
            prompt_hidden = hidden.gather(1, slots.reshape(B, -1, 1).expand(-1, -1, H))  # [B, m*n, H]
            prompt_slot_logits = self.logits(prompt_hidden)  # [B, m*n, V]
        else:
            prompt_slot_logits = slot_logits.gather(1, slots.reshape(B, -1, 1).expand(-1, -1, V))  # [B, m*n, V]
        prompt_logits = at_least_fp32(prompt_slot_logits).view(B, m, n, V).mean(2)  # [B, m, V]

        # Keep the KV of the root and the accepted candidates only, right after each row's end.
        if D == 0:
            # Root-only trees (plain decoding, or every row in state 0): the root's column stays where the model
            # wrote it, at T, as in plain decoding. Moving it to each row's end cost 2 KV ops per layer a step,
            # 1-2% of a batch-16 step on a CPU, and more where a step is bound by kernel launches.
            start = torch.full_like(kv.end, T)  # [B]
        else:
            start = kv.end  # [B]
            if pruning is None:
                move_kv(cache, src=T + path, dst=start[:, None] + torch.arange(D + 1, device=root.device))
            else:  # the later layers hold the survivors only, compacted: the path's slots sit elsewhere there
                c, L = pruning[1], self.prune_head.layer
                cols = min(D + 1, c.width)  # every accepted path survived, so it fits in its row's survivors
                dst = start[:, None] + torch.arange(cols, device=root.device)
                move_kv(cache, src=T + path[:, :cols], dst=dst, layers=slice(0, L))
                move_kv(cache, src=T + c.position.gather(1, path[:, :cols]), dst=dst, layers=slice(L, None))
        kv = kv.after_step(start, n_acc + 1, N)
        return tokens, n_acc + 1, bonus.squeeze(1), prompt_logits, n_prompt, kv

    def _root_only_step(self, cache, kv: RowKV, root, draw=None):
        """``step`` for a root-only tree set (plain decoding, as ProPD chooses where no tree pays): the same
        forward and the same results as the general path, without its tree gathers, acceptance walk and KV
        bookkeeping, which cost ~50 small tensor ops a step: 1-2.5% of a batch-1 step on the 2-core CPU, and
        kernel launches on a GPU. Returns as ``step`` does; every row emits its one token and holds no guesses."""
        B = root.shape[0]
        T = cache.get_seq_length()
        assert kv.valid.shape[1] == T, "the rows' KV layout and the cache disagree"
        hidden = one_token_forward(self.decoder, cache, root, kv.valid, kv.length, self.embed.weight.dtype)  # [B, H]
        self.passes += 1
        self.tokens_processed += B
        logits = self.logits(hidden)  # [B, V]
        rows = torch.arange(B, device=root.device)
        bonus = logits.argmax(-1) if draw is None else draw(logits, 0, rows)  # [B]
        ones = torch.ones_like(bonus)  # [B]: one token each
        prompt_logits = at_least_fp32(logits.new_empty(B, 0, logits.shape[-1]))  # [B, 0, V]: no guesses
        kv = kv.after_step(torch.full_like(kv.end, T), ones, 1)  # the new column stays where it was written
        return bonus[:, None], ones, bonus, prompt_logits, torch.zeros_like(bonus), kv


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
