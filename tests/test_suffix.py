"""The suffix speculator (trees/suffix.py), the model-free comparison of the adaptation benchmark: tries checked
against literals, and its replay against steps counted by hand."""

from trees.suffix import SuffixIndex, accepted, replay_suffix


def test_the_trie_holds_the_most_frequent_continuations_of_the_longest_match():
    index = SuffixIndex(max_match=3)
    index.add([1, 2, 3, 4])
    index.add([9, 2, 3, 5])
    index.add([7, 2, 3, 4, 6])
    # "2 3" occurs three times: 4 follows twice (then 6 once, or the end), 5 once.
    assert index.propose([8, 2, 3], max_nodes=10, max_depth=2) == (2, {4: {6: {}}, 5: {}})
    assert index.propose([8, 2, 3], max_nodes=1, max_depth=2) == (2, {4: {}})
    # "1 2 3" is longer and occurs once: only its continuation.
    assert index.propose([1, 2, 3], max_nodes=10, max_depth=3) == (3, {4: {}})
    assert index.propose([42], max_nodes=10, max_depth=3) == (0, {})


def test_acceptance_follows_the_true_text_down_the_trie():
    trie = {4: {6: {}, 7: {8: {}}}, 5: {}}
    assert accepted(trie, [4, 7, 8, 1]) == 3
    assert accepted(trie, [4, 9]) == 1
    assert accepted(trie, [3]) == 0


def test_replay_counts_the_steps_a_suffix_decoder_takes():
    index = SuffixIndex(max_match=4)
    first = ([10, 11], [1, 2, 3, 4, 5])  # nothing to match: one token a step (5 steps)
    second = ([12, 13], [1, 2, 3, 4, 5])  # after its first token, "1" is found: 2 3 4 5 in one step
    assert replay_suffix([first], index) == (5, 5)
    assert replay_suffix([second], index) == (5, 2)
