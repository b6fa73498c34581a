"""Medusa candidate trees (decodekit.decoding.tree): the flat order, parents, depths, the ancestor
mask and the candidates, checked against hand-written expectations; bad trees get clear errors."""

import pytest
import torch

from decodekit.decoding.tree import DEFAULT_TREE, Tree, chain_tree


def test_hand_tree_order_parents_mask():
    # paths given out of order; flat order: root, (0), (1), (0,0), (0,1), (1,0), (0,0,0)
    t = Tree([[0, 0, 0], [1], [0, 1], [0], [1, 0], [0, 0]], num_heads=3)
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert t.num_nodes == 7 and t.depth == 3 and t.top_k == 2
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.heads.tolist() == [-1, 0, 0, 1, 1, 1, 2]
    assert t.ranks.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    want = torch.zeros(7, 7, dtype=torch.bool)
    for i, anc in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 1, 3, 6]]):
        want[i, anc] = True
    assert torch.equal(t.mask, want)


def test_candidates_and_path_tokens():
    t = Tree([[0], [1], [0, 0], [1, 0]], num_heads=2)
    roots = torch.tensor([5, 6])
    # head_top_ids[b, head, rank]
    top = torch.tensor([[[10, 11], [20, 21]], [[30, 31], [40, 41]]])
    cand = t.candidates(roots, top)
    # nodes: root, (0)->head0 rank0, (1)->head0 rank1, (0,0)->head1 rank0, (1,0)->head1 rank0
    assert cand.tolist() == [[5, 10, 11, 20, 20], [6, 30, 31, 40, 40]]
    assert t.path_tokens(cand)[0] == [[], [10], [11], [10, 20], [11, 20]]


def test_chain_and_default_tree_are_valid():
    t = Tree(chain_tree(3), num_heads=3)
    assert t.parents.tolist() == [-1, 0, 1, 2]
    assert torch.equal(t.mask, torch.ones(4, 4, dtype=torch.bool).tril())
    d = Tree(DEFAULT_TREE, num_heads=4)
    assert d.num_nodes >= 2
    assert d.num_nodes == len(DEFAULT_TREE) + 1
    assert all(int(d.parents[i]) < i for i in range(1, d.num_nodes))


@pytest.mark.parametrize(
    "paths, heads, max_nodes, match",
    [
        ([[0], [0, 1, 0]], 3, None, "no parent"),
        ([[0], [0, 0], [0, 0]], 3, None, "duplicate path"),
        ([[0], [0, 0], [0, 0, 0]], 2, None, "past the number of heads"),
        ([[0], [1], [2]], 3, 3, "max_nodes"),
        ([], 3, None, "must not be empty"),
        ([[]], 3, None, "at least one rank"),
        ([[-1]], 3, None, "ranks must be ints >= 0"),
        ([[0.5]], 3, None, "ranks must be ints >= 0"),
    ],
)
def test_bad_trees(paths, heads, max_nodes, match):
    with pytest.raises(ValueError, match=match):
        Tree(paths, num_heads=heads, max_nodes=max_nodes)


def test_bad_tree_types():
    with pytest.raises(TypeError, match="list of paths"):
        Tree("0,1", num_heads=2)
    with pytest.raises(TypeError, match="list of ranks"):
        Tree([0, 1], num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        Tree([[0]], num_heads=0)
    t = Tree([[0], [1]], num_heads=2)
    with pytest.raises(ValueError, match="needs 1 heads with 2 candidates"):
        t.candidates(torch.tensor([1]), torch.zeros(1, 2, 1, dtype=torch.int64))
