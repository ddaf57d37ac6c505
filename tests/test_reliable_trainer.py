"""ReliableTrainer's own state: what DefaultTrainer (v0.6 only with a patch) and detectron2's
LRScheduler hook (v0.6: only some scheduler classes) would otherwise have to save."""

import torch
from _detection_common import R18_FPN_TOY, make_cfg
from detectron2.utils.env import seed_all_rng
from torch.nn.parallel import DistributedDataParallel

from nst_det.engine import DetectionTrainer


def test_data_seed_changes_the_data_order_alone(tmp_path, tiny_voc):
    def first_files(*opts):
        cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "DATASETS.TEST", "()", *opts],
                       data=tiny_voc[:2], output_dir=tmp_path)
        loader = DetectionTrainer.build_train_loader(cfg)
        stream = iter(loader)
        return loader.nst_data_seed, [d["file_name"] for _ in range(4) for d in next(stream)]

    seed0, order0 = first_files("SEED", "0")
    seed7, order7 = first_files("SEED", "0", "NST_DET.DATA_SEED", "7")
    assert (seed0, seed7) == (0, 7)
    assert order7 == first_files("SEED", "7")[1] != order0  # SEED's order, and not SEED 0's


def test_data_seed_leaves_the_initialisation_and_the_steps_random_draws_alone(tmp_path, tiny_voc):
    # the methods benchmark's A/A control changes NST_DET.DATA_SEED only: its new layers must
    # start as the plain run's, and its RPN / RoI sampling draw from the same generator state
    def built(*opts):
        cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "DATASETS.TEST", "()", "SEED", "0",
                                     *opts], data=tiny_voc[:2], output_dir=tmp_path)
        seed_all_rng(cfg.SEED)  # as default_setup does
        trainer = DetectionTrainer(cfg)
        return trainer.model.state_dict(), torch.get_rng_state(), trainer.data_loader

    weights, rng, loader = built()
    weights7, rng7, loader7 = built("NST_DET.DATA_SEED", "7")
    assert (loader.nst_data_seed, loader7.nst_data_seed) == (0, 7)
    assert weights.keys() == weights7.keys()
    for key in weights:
        torch.testing.assert_close(weights7[key], weights[key], rtol=0, atol=0)
    assert torch.equal(rng7, rng)


def test_checkpoint_restores_optimizer_and_scheduler_state(tmp_path, tiny_voc):
    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "3",
                                 "SOLVER.STEPS", "(2,)", "SOLVER.CHECKPOINT_PERIOD", "100",
                                 "DATASETS.TEST", "()"],
                   data=tiny_voc[:2], output_dir=tmp_path)
    trainer = DetectionTrainer(cfg)
    assert not isinstance(trainer.model, DistributedDataParallel)  # one process: no wrapper
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["trainer"]
    momenta = [s["momentum_buffer"] for s in saved["_trainer"]["optimizer"]["state"].values()]
    assert momenta and all(torch.count_nonzero(m) > 0 for m in momenta)
    assert saved["scheduler"]["last_epoch"] == 3

    resumed = DetectionTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3 and resumed.scheduler.last_epoch == 3
    assert [g["lr"] for g in resumed.optimizer.param_groups] == \
        [g["lr"] for g in trainer.optimizer.param_groups]
    before, after = trainer.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key]["momentum_buffer"], before[key]["momentum_buffer"])
    # the resumed step trainer reads the same stream (seed from the checkpoint) from iteration 3
    seed = resumed.data_loader.nst_data_seed
    assert seed == trainer.data_loader.nst_data_seed
    stream = iter(DetectionTrainer.build_train_loader(cfg, seed=seed))
    fourth = [next(stream) for _ in range(4)][-1]
    first = next(iter(resumed.data_loader))
    assert [d["file_name"] for d in first] == [d["file_name"] for d in fourth]
    torch.testing.assert_close(first[0]["image"], fourth[0]["image"])


def test_a_finished_run_resumed_from_its_weights_only_final_checkpoint_trains_no_more(
        tmp_path, tiny_voc):
    # the pipeline's stages save model_final without trainer state; a stage stopped during its
    # final evaluation resumes from it and must only evaluate, not train from iteration 1 again
    cfg = make_cfg(R18_FPN_TOY, ["MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "3",
                                 "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()",
                                 "NST_DET.FINAL_CHECKPOINT_WEIGHTS_ONLY", "True"],
                   data=tiny_voc[:2], output_dir=tmp_path)
    trainer = DetectionTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert "trainer" not in torch.load(tmp_path / "model_final.pth", weights_only=True)

    resumed = DetectionTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.checkpointer.resumed_from.endswith("model_final.pth")
    assert resumed.start_iter == 3  # = MAX_ITER: nothing left to train
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
