"""Loss math against numbers computed by hand.

ranking = mean_k -log sigmoid(r_b - r_w - m) = mean_k log(1 + exp(-(r_b - r_w - m)))
"""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from rmkit.loss import combine, imitation_loss, pair_accuracy, ranking_loss


def nll(d: float) -> float:
    return math.log(1.0 + math.exp(-d))


def test_ranking_loss_by_hand() -> None:
    rewards = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    better, worse = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1])
    # differences: 2 - 0 = 2, 2 - 1 = 1, 1 - 0 = 1
    expected = (nll(2.0) + nll(1.0) + nll(1.0)) / 3
    loss = ranking_loss(rewards, better, worse)
    assert_close(loss, torch.tensor(expected))
    loss.backward()
    # d/dr_b of log(1+exp(-d)) = -sigmoid(-d); r0 is better twice, r1 worse twice, r2 once each.
    s = lambda d: 1.0 / (1.0 + math.exp(d))  # noqa: E731  sigmoid(-d)
    expected_grad = torch.tensor([-(s(2) + s(1)) / 3, (s(2) + s(1)) / 3, (s(1) - s(1)) / 3])
    assert_close(rewards.grad, expected_grad)


def test_ranking_loss_margin() -> None:
    rewards = torch.tensor([2.0, 0.0, 1.0])
    loss = ranking_loss(rewards, torch.tensor([0, 2]), torch.tensor([1, 1]), margin=0.5)
    assert_close(loss, torch.tensor((nll(1.5) + nll(0.5)) / 2))


def test_ranking_loss_no_pairs_keeps_graph() -> None:
    rewards = torch.tensor([1.0, 3.0], requires_grad=True)
    empty = torch.tensor([], dtype=torch.long)
    loss = ranking_loss(rewards, empty, empty)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert_close(rewards.grad, torch.zeros(2))


def test_pair_accuracy_ties_count_wrong() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    better, worse = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 3])
    # 1 > 1 no (tie), 1 > 0 yes, 0 > 2 no
    assert pair_accuracy(rewards, better, worse) == (1, 3)
    assert pair_accuracy(rewards, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == (0, 0)


def test_imitation_loss_passes_the_weighted_nll() -> None:
    assert imitation_loss(torch.tensor(1.5)).item() == 1.5
    assert imitation_loss(None).item() == 0.0


def test_combine_weights_and_zero_weight_nan() -> None:
    r, i = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    total = combine(r, i, 1.0, 0.5)
    assert_close(total, torch.tensor(3.5))
    total.backward()
    assert r.grad.item() == 1.0 and i.grad.item() == 0.5
    # weight 0: the term is dropped even when NaN, but its graph is kept (grad 0)
    nan = torch.tensor(float("nan"), requires_grad=True)
    total = combine(torch.tensor(2.0), nan, 1.0, 0.0)
    assert total.item() == 2.0
    total.backward()
    assert nan.grad.item() == 0.0


def test_pair_rule_is_one_in_training_and_eval() -> None:
    """Training's pair_accuracy and eval's tally judge pairs by one rule (loss.pair_correct):
    strictly higher is right; a tie or a NaN is wrong. Scores (3, 2, 1, 0) give 6 pairs; with
    rewards (1, 1, 0, nan) only (0, 2) and (1, 2) are right."""
    from rmkit.data.collate import EncodedRecord
    from rmkit.data.records import strict_pairs
    from rmkit.loss import pair_correct
    from rmkit.score import SetResult, tally

    assert pair_correct(2.0, 1.0) is True and pair_correct(1.0, 1.0) is False
    assert pair_correct(float("nan"), 0.0) is False and pair_correct(0.0, float("nan")) is False
    assert pair_correct(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])).tolist() == [True, False, False]
    scores, rewards = (3.0, 2.0, 1.0, 0.0), [1.0, 1.0, 0.0, float("nan")]
    pairs = strict_pairs(scores)
    better, worse = torch.tensor([b for b, _ in pairs]), torch.tensor([w for _, w in pairs])
    assert pair_accuracy(torch.tensor(rewards), better, worse) == (2, 6)
    result = SetResult()
    tally(result, EncodedRecord([1], [[2], [3], [4], [5]], scores), rewards, [1, 1, 1, 1])
    assert (result.correct, result.pairs, result.groups_all_correct) == (2, 6, 0)
    constant = SetResult()
    tally(constant, EncodedRecord([1], [[2], [3]], (1.0, 0.0)), [0.5, 0.5], [1, 1])
    assert constant.accuracy == 0.0 and pair_accuracy(torch.tensor([0.5, 0.5]), torch.tensor([0]), torch.tensor([1])) == (0, 1)
