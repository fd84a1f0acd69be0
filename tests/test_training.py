"""The set-up every training task shares: steps, effective batch and lr, and the batches each
process reads; exercised directly, since the commands' tests only see their sums."""

from __future__ import annotations

import pytest

from localmim_cli.config.schema import FinetuneSettings, PretrainSettings
from localmim_cli.data.samplers import StepBatches
from localmim_cli.engine.plan import plan_steps
from localmim_cli.errors import DataError


def pretrain_settings(**train) -> PretrainSettings:
    return PretrainSettings.model_validate({"train": {"epochs": 10, **train},
                                            "optim": {"base_lr": 1.5e-4, "warmup_epochs": 2}})


def test_steps_effective_batch_and_scaled_lr():
    s = pretrain_settings(batch_size=8, accum_steps=2)
    plan = plan_steps(100, s, world_size=3)
    # A global micro-batch is 8 x 3 = 24 images: 4 of them per epoch (4 images left over),
    # and 2 micro-steps per optimizer step.
    assert (plan.steps_per_epoch, plan.micro_steps_per_epoch, plan.total_steps) == (2, 4, 20)
    assert plan.effective_batch == 48
    assert plan.lr == pytest.approx(1.5e-4 * 48 / 256)
    assert "= 48; lr = 0.00015 x 48 / 256" in plan.scaling
    # The schedule: linear warmup over 2 epochs (4 steps), then cosine down to min_lr.
    assert plan.lr_at(0) == 0.0
    assert plan.lr_at(2) == pytest.approx(plan.lr / 2)
    assert plan.lr_at(4) == pytest.approx(plan.lr)
    assert plan.lr_at(20) == pytest.approx(s.optim.min_lr)


def test_an_absolute_lr_is_not_scaled():
    s = FinetuneSettings.model_validate({"train": {"batch_size": 4}, "optim": {"lr": 1e-3}})
    plan = plan_steps(40, s, world_size=2)
    assert (plan.steps_per_epoch, plan.effective_batch, plan.lr) == (5, 8, 1e-3)
    assert "set directly by optim.lr" in plan.scaling


def test_too_few_images_for_one_optimizer_step_says_what_to_change():
    s = pretrain_settings(batch_size=8, accum_steps=2)
    plan_steps(32, s, world_size=2)            # exactly one step: 8 x 2 processes x 2 micro-steps
    with pytest.raises(DataError) as err:
        plan_steps(31, s, world_size=2)
    message = str(err.value)
    for phrase in ("31 training images", "8 per device x 2 process(es) x 2 accumulation",
                   "train.batch_size", "data.repeats"):
        assert phrase in message


def test_processes_split_each_global_micro_batch_and_the_epoch_rides_along():
    one = StepBatches(20, batch=4, rank=0, world=1, seed=7)
    ranks = [StepBatches(20, batch=2, rank=r, world=2, seed=7) for r in range(2)]
    for sampler in (one, *ranks):
        sampler.set_position(epoch=3, start=1, stop=4)
    whole = list(one)
    parts = [list(r) for r in ranks]
    assert len(whole) == len(one) == 3
    for step, batch in enumerate(whole):
        assert batch == parts[0][step] + parts[1][step]   # same images, however many processes
        assert all(epoch == 3 for epoch, _ in batch)
    # Another epoch, another order; a resumed pass starts where the first one was cut.
    one.set_position(epoch=4, start=0, stop=5)
    assert list(one)[1:4] != whole
    one.set_position(epoch=3, start=0, stop=5)
    assert list(one)[1:4] == whole
    with pytest.raises(ValueError):
        one.set_position(epoch=3, start=0, stop=6)


def test_the_run_loader_keeps_its_workers_and_each_sample_its_epoch():
    """One loader serves every epoch with persistent workers; what they return for (epoch, i)
    is what the dataset gives for (epoch, i) in this process, so no epoch repeats another's
    augmentations and a resumed pass reads what the uninterrupted one would have."""
    import os

    import torch

    from localmim_cli.data.sample_photos import sample_photo_paths
    from localmim_cli.engine.training import run_loader
    from localmim_cli.tasks.features import AugmentedSamples

    def augment(image):
        """Draws from the global generators, as timm's transforms do; says which process ran it."""
        return torch.cat([torch.rand(3), torch.tensor([float(os.getpid())])])

    samples = [(path, label) for label, path in enumerate(sample_photo_paths())]
    dataset = AugmentedSamples(samples, augment, seed=5, draft_size=32, repeats=2)
    sampler = StepBatches(len(dataset), batch=3, rank=0, world=1, seed=5)
    loader = run_loader(dataset, sampler, workers=2, device=torch.device("cpu"))

    seen, pids = {}, set()
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        sampler.set_position(epoch, start, 4)
        keys = list(sampler)
        for step, (x, y) in enumerate(loader, start=start):
            batch = keys[step - start]
            assert torch.equal(x[:, :3], torch.stack([dataset[key][0][:3] for key in batch]))
            assert y.tolist() == [samples[i % len(samples)][1] for _, i in batch]
            assert torch.equal(seen.setdefault((epoch, step), x[:, :3]), x[:, :3])
            pids.update(int(p) for p in x[:, 3].tolist())
    assert os.getpid() not in pids and len(pids) <= 2      # the same two workers for every pass
    assert not torch.equal(seen[(0, 0)], seen[(1, 0)])
