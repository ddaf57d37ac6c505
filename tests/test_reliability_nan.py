"""Loud NaN: a non-finite loss term stops training before its step is applied."""

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from nst_det.engine.nan_guard import install_nan_guard


class TwoLosses(torch.nn.Module):
    """loss_cls = w^2; loss_nst = w * scale (scale = nan / inf poisons it)."""

    def __init__(self, scale):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.scale = scale

    def forward(self, batch):
        return {"loss_cls": (self.w ** 2).sum(), "loss_nst": self.w.sum() * self.scale}


def _step(scale, iteration=7):
    model = TwoLosses(scale)
    install_nan_guard(model)
    trainer = SimpleTrainer(model, [[0]] * 10, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.iter = iteration
    with EventStorage(iteration) as storage:
        trainer.storage = storage
        trainer.run_step()
    return model


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_before_the_step(bad):
    model = TwoLosses(bad)
    install_nan_guard(model)
    before = model.w.detach().clone()
    trainer = SimpleTrainer(model, [[0]] * 10, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.iter = 7
    with EventStorage(7) as storage:
        trainer.storage = storage
        with pytest.raises(FloatingPointError, match=r"iteration 7.*'loss_nst': (nan|-?inf)"):
            trainer.run_step()
    assert torch.equal(model.w.detach(), before)  # the poisoned update was never applied


def test_finite_losses_train_normally():
    model = _step(1.0)
    assert not torch.equal(model.w.detach(), torch.ones(3))


def test_guard_ignores_eval_mode_outputs():
    model = TwoLosses(float("nan")).eval()
    install_nan_guard(model)
    assert torch.isnan(model(None)["loss_nst"])  # inference outputs are not training losses
