"""AdaMix's consistency regularisation for MAdaKron: a second forward pass (new expert draws, new dropout) and
the symmetric KL between the two predictive distributions, each side's target detached."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer


def consistency_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``½[KL(sg p2 ‖ p1) + KL(sg p1 ‖ p2)]`` over a batch of logits (B, C). A single output (regression), where a
    softmax would be constant, uses the squared difference instead, ``½[(sg o2 − o1)² + (sg o1 − o2)²]``."""
    if first.shape[-1] == 1:
        return 0.5 * (F.mse_loss(first, second.detach()) + F.mse_loss(second, first.detach()))
    log_p1, log_p2 = F.log_softmax(first.float(), -1), F.log_softmax(second.float(), -1)
    return 0.5 * (F.kl_div(log_p1, log_p2.detach(), log_target=True, reduction="batchmean")
                  + F.kl_div(log_p2, log_p1.detach(), log_target=True, reduction="batchmean"))


class ConsistencyTrainer(Trainer):
    """A Trainer whose training loss adds ``consistency_weight`` × consistency_loss of two forward passes. The
    second pass doubles the forward cost of a step; evaluation is unchanged (one pass, merged experts)."""

    consistency_weight: float = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training and self.consistency_weight:
            second = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = loss + self.consistency_weight * consistency_loss(outputs.logits, second.logits)
        return (loss, outputs) if return_outputs else loss
