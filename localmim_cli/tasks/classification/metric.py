"""Validation of a classifier: top-1, top-5 and loss, summed over processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from localmim_cli.config.schema import FinetuneSettings


def validate(model: "torch.nn.Module", samples, img_size: int, settings: "FinetuneSettings",
             device: "torch.device", precision: str, world) -> dict[str, float]:
    """top-1, top-5 (top-k with k = min(5, classes)) and loss on the validation samples, each
    process taking every world-size-th image; counts are summed over processes."""
    import torch
    from torch.utils.data import DataLoader

    from localmim_cli.engine import distributed
    from localmim_cli.data.samplers import loader_kwargs
    from localmim_cli.engine.loop import autocast
    from localmim_cli.tasks.features import EvalSamples

    mine = list(samples)[world.rank::world.size]
    batch = settings.train.eval_batch_size or settings.train.batch_size
    totals = torch.zeros(4, device=device, dtype=torch.float64)   # correct1, correct5, loss sum, n
    if mine:
        loader = DataLoader(EvalSamples(mine, img_size, settings.data.eval_crop_fraction), batch_size=batch,
                            shuffle=False, **loader_kwargs(settings.data.workers, device))
        was_training = model.training
        model.eval()
        k = min(5, model.num_classes)
        with torch.no_grad():
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with autocast(precision, device):
                    logits = model(images)
                logits = logits.float()
                top = logits.topk(k, dim=1).indices                      # (B, k)
                hit = top == labels[:, None]
                totals[0] += hit[:, 0].sum()
                totals[1] += hit.any(dim=1).sum()
                totals[2] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                totals[3] += labels.numel()
        model.train(was_training)
    totals = distributed.all_reduce_mean(totals, world) * world.size
    c1, c5, loss, n = totals.tolist()
    n = max(n, 1)
    return {"val_top1": 100 * c1 / n, "val_top5": 100 * c5 / n, "val_loss": loss / n, "val_images": int(n)}
