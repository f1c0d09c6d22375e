"""Losses and accuracy for reward training: pure functions of tensors, no model, no state.

Notation: r = rewards [N]; (b_k, w_k), k = 1..P, the (better, worse) row pairs of a batch.

  ranking   = 1/P * sum_k  -log sigmoid(r[b_k] - r[w_k] - margin)      (Bradley-Terry NLL)
  imitation = sum_t w_t * NLL_t over the imitation targets, the weights set by the collator:
              "token"    w_t = 1 / (target tokens of the batch)             (rmkit's token mean)
              "sequence" w_t = 1 / (|s| * S) for token t of target s, S targets  (the paper's)
  total     = ranking_weight * ranking + imitation_weight * imitation
"""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                 margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Mean over pairs of -logsigmoid(r_b - r_w - margin).

    No pairs (e.g. every record tied) gives 0 that still depends on `rewards`, so backward
    runs and every rank takes part in the gradient reduction.
    """
    if better.numel() == 0:
        return rewards.sum() * 0.0
    diff = rewards[better].float() - rewards[worse].float() - margin
    return -F.logsigmoid(diff).mean()


def imitation_loss(lm_loss: torch.Tensor | None) -> torch.Tensor:
    """The model's weighted NLL (`RewardOutput.lm_loss`), 0 when there are no targets (with
    padding chunks from lm_min_chunks the 0 keeps lm_head in the graph)."""
    if lm_loss is None:
        return torch.zeros(())
    return lm_loss


@overload
def pair_correct(better: float, worse: float) -> bool: ...


@overload
def pair_correct(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor: ...


def pair_correct(better: float | torch.Tensor, worse: float | torch.Tensor) -> bool | torch.Tensor:
    """The pair-accuracy rule, written once (training's `pair_accuracy`, eval's `score.tally`):
    correct only when r_b > r_w strictly. Equal rewards count wrong, so a constant model scores
    0, not 50%; a NaN reward counts wrong too. Floats give a bool, tensors an elementwise mask."""
    return better > worse


def pair_accuracy(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over a batch's pairs, each judged by `pair_correct`."""
    if better.numel() == 0:
        return 0, 0
    correct = int(pair_correct(rewards[better], rewards[worse]).sum())
    return correct, int(better.numel())


def combine(ranking: torch.Tensor, imitation: torch.Tensor, ranking_weight: float,
            imitation_weight: float) -> torch.Tensor:
    """ranking_weight * ranking + imitation_weight * imitation.

    A term with weight 0 stays in the graph as exactly 0 (NaN replaced first), so every
    parameter still receives a gradient (equal reductions on every rank) and a NaN in an
    unused term cannot leak into the total.
    """
    def term(loss: torch.Tensor, weight: float) -> torch.Tensor:
        return loss * weight if weight else torch.nan_to_num(loss) * 0.0

    return term(ranking, ranking_weight) + term(imitation, imitation_weight).to(ranking.device)
