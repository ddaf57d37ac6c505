"""Runs of several processes: every rank ends on a failure, evaluates the model that is saved,
and what one rank saw is said where the user reads (rank 0's log and the raised error)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _detection_common import R18_FPN_TOY, make_cfg
from _rank_checks import rank_checks, train_then_dump_buffers
from detectron2.engine import launch

from nst_det.engine.eval_hook import TrainingEvalHook


@pytest.mark.parametrize("iteration, step_done, evaluated", [
    (4, 3, True), (5, None, True),  # the loop finished (a resume with nothing left: max_iter + 1)
    (3, 3, True),  # the last step ran, a hook after it failed (rank 0's checkpoint write): the
    # other ranks finished and evaluate, so this one must take part in the collectives too
    (3, 2, False)])  # the last step failed: its peers wait in the step's collective
def test_the_final_evaluation_runs_only_when_the_last_step_ran(iteration, step_done, evaluated):
    """TrainerBase.train leaves iter == max_iter after its loop and the failing iteration after
    an error: detectron2's EvalHook evaluated after a failed last step too, and with several
    processes the failed rank waited in the evaluation's gathers while the others waited in the
    step's collective."""
    calls = []
    hook = TrainingEvalHook(0, lambda: calls.append(1) or {})
    hook.trainer = SimpleNamespace(iter=iteration, max_iter=4, last_step_done=step_done)
    hook.after_train()
    assert calls == ([1] if evaluated else [])


@pytest.mark.slow
def test_two_ranks_share_buffers_name_a_nan_and_report_skipped_images(tmp_path):
    launch(rank_checks, 2, dist_url="auto", args=(str(tmp_path),))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the evaluated BN statistics are rank 0's (the checkpoint's) on every rank
    assert ranks[0]["running_mean"] == ranks[1]["running_mean"] == [1.0, 1.0, 1.0]
    # the error rank 0 raises (the one launch shows) names rank 1's loss and its teacher
    for seen in ranks:
        assert "loss_nst = nan on rank 1" in seen["nan_message"]
        assert "The teacher's output is non-finite" in seen["nan_message"]
    # rank 0 says what both skipped (distinct images), rank 1 says nothing more
    assert ranks[0]["skip_report"] == [
        "Skipped 2 unreadable training images (NST_DET.SKIP_BAD_IMAGES), each met once per "
        f"epoch and per loading worker: they are listed in {tmp_path}/skipped_images.rank0.txt, "
        f"{tmp_path}/skipped_images.rank1.txt"]
    assert ranks[1]["skip_report"] == []


@pytest.mark.slow
def test_every_rank_evaluates_with_the_bn_statistics_that_are_saved(tmp_path, tiny_voc):
    """Each rank's BN running statistics follow its own batches (DDP does not broadcast
    buffers) and only rank 0's are saved: rank 1 evaluated its half of the test set with its
    own, so the AP reported (and model_best) was not the saved model's, nor a resumed run's."""
    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2", "SEED", "3",
                                 "SOLVER.IMS_PER_BATCH", "4", "TEST.EVAL_PERIOD", "0"],
                   data=tiny_voc[:2], output_dir=tmp_path / "out")
    assert cfg.MODEL.RESNETS.NORM == "BN" or cfg.MODEL.FPN.NORM == "BN"  # statistics to differ
    config_file = tmp_path / "bn.yaml"
    config_file.write_text(cfg.dump())
    launch(train_then_dump_buffers, 2, dist_url="auto",
           args=(str(config_file), tiny_voc[0][: -len("_trainval")], tiny_voc[2], str(tmp_path)))
    rank0, rank1 = (torch.load(tmp_path / f"buffers.rank{r}.pt") for r in (0, 1))
    assert rank0 and rank0.keys() == rank1.keys()
    differ = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differ, f"{len(differ)} buffers differ after the final evaluation: {differ[:3]}"
