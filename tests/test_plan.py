import numpy as np
import pytest

from onnxprune import keep_count, prune_attention_heads, select_heads
from onnxprune.plan import plan_block


def test_issue_examples():
    out, kept = prune_attention_heads(np.random.rand(4, 3, 3), [0.8, 0.3, 0.9, 0.2], 0.5)
    assert out.shape == (2, 3, 3) and kept == [0, 2]
    out, kept = prune_attention_heads(np.random.rand(2, 2, 2), [0.6, 0.4], 0.5)
    assert out.shape == (1, 2, 2) and kept == [0]
    attn = np.random.rand(3, 2, 2)
    out, kept = prune_attention_heads(attn, [0.5, 0.8, 0.3], 0.0)
    assert kept == [0, 1, 2] and np.array_equal(out, attn)


def test_slices_the_right_heads():
    attn = np.arange(4 * 2 * 2).reshape(4, 2, 2)
    out, kept = prune_attention_heads(attn, [0.1, 0.9, 0.2, 0.8], 0.5)
    assert kept == [1, 3] and np.array_equal(out, attn[[1, 3]])


@pytest.mark.parametrize("heads,ratio,want", [(10, 0.8, 2), (10, 0.7, 3), (12, 1 / 3, 8), (3, 0.1, 2),
                                              (100, 0.29, 71), (7, "0.3", 4), (8, 1.0, 1)])
def test_keep_count_is_exact(heads, ratio, want):
    assert keep_count(heads, ratio) == want


def test_naive_float_would_be_wrong():
    assert int(10 * (1 - 0.8)) == 1      # why exact arithmetic is needed
    assert len(select_heads(list(range(10)), 0.8)) == 2


def test_ties_go_to_lower_index_and_result_is_ascending():
    assert select_heads([1, 1, 1, 1], 0.5) == [0, 1]
    assert select_heads([0.2, 0.9, 0.9, 0.1], 0.5) == [1, 2]
    assert select_heads([0.1, 0.5, 0.9], 0.34) == [2]          # floor(3 * 0.66) = 1
    assert select_heads([0.1, 0.5, 0.9], 0.33) == [1, 2]       # floor(3 * 0.67) = 2


def test_min_heads():
    assert select_heads([0.1, 0.5, 0.9, 0.3], 1.0, min_heads=2) == [1, 2]
    assert select_heads([0.1, 0.5, 0.9, 0.3], 1.0, min_heads=0) == []
    plan = plan_block([0.1, 0.5, 0.9, 0.3], 1.0, [(0,), (1,), (2,), (3,)], min_heads=1)
    assert plan.kept_heads == (2,) and plan.min_heads_applied


def test_gqa_uniform_keeps_same_count_per_group():
    plan = plan_block([9, 8, 7, 6, 1, 2, 3, 4], 0.5, [(0, 1, 2, 3), (4, 5, 6, 7)])
    assert plan.kept_heads == (0, 1, 6, 7)


@pytest.mark.parametrize("bad", [
    dict(attn=np.zeros((2, 2, 2)), importance=[np.nan, 1.0], ratio=0.5),
    dict(attn=np.zeros((2, 2, 2)), importance=[1.0, 2.0, 3.0], ratio=0.5),
    dict(attn=np.zeros((2, 2, 2)), importance=[1.0, 2.0], ratio=1.5),
    dict(attn=np.zeros((2, 2, 2)), importance=[1.0, 2.0], ratio=-0.1),
    dict(attn=np.zeros((2, 2)), importance=[1.0, 2.0], ratio=0.5),
    dict(attn=np.zeros((2, 2, 2)), importance=[1.0, 2.0], ratio="half"),
])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        prune_attention_heads(**bad)
