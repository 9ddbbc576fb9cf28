"""The decoding core: pure torch + transformers. No Ray, no Arrow, no file system."""

from decoding.ppd import PPDDecoder
from decoding.prompt_tokens import PromptTokens, PromptTokensMeta
from decoding.reference import reference_greedy, reference_sample
from decoding.results import FinishReason, RowResult
from decoding.sampling import SamplingParams, completion_seed
from decoding.tree import (
    TreeSet,
    TreeSpec,
    chain_tree_set,
    default_tree_set,
    rank_budget_tree_set,
    tree_buffers,
    tree_set_buffers,
    vanilla_tree_set,
)
from decoding.vanilla import VanillaDecoder

__all__ = [
    "FinishReason", "PPDDecoder", "PromptTokens", "PromptTokensMeta", "RowResult", "SamplingParams", "TreeSet",
    "TreeSpec", "VanillaDecoder", "chain_tree_set", "completion_seed", "default_tree_set", "rank_budget_tree_set",
    "reference_greedy", "reference_sample", "tree_buffers", "tree_set_buffers", "vanilla_tree_set",
]
