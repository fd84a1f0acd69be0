"""The online k-NN monitor: how well a pretraining run's frozen features separate the classes of
a small labelled folder, measured every few epochs while it trains.

The folder's images are decoded, centre-cropped and normalized once and kept as one tensor; each
measurement is a forward of the encoder in eval mode (no drop path, no dropout) over that tensor
and a cosine k-NN vote of the held-out images against the rest. Nothing here draws from a random
generator the training uses, so a run with the monitor trains exactly as one without it, and a
resumed run stays bitwise exact. The floor — the same measurement on the encoder as initialised —
is taken once, before a fresh run's first step.
"""

from __future__ import annotations

from typing import Any

import torch

from localmim_cli.config.schema import MonitorSettings
from localmim_cli.data.images import center_crop_transform, load_rgb
from localmim_cli.errors import DataError
from localmim_cli.tasks.features import labelled_split
from localmim_cli.tasks.probes import knn_scores


class KnnMonitor:
    def __init__(self, settings: MonitorSettings, img_size: int, seed: int, device: torch.device):
        if settings.path is None:
            raise DataError("train.monitor.path: give a labelled folder (one subfolder per class)")
        split = labelled_split(settings.path, None, settings.val_fraction, seed)
        if len(split.classes) < 2 or not split.val or not split.train:
            raise DataError(f"train.monitor.path {settings.path}: the monitor needs two or more classes "
                            f"and images on both sides of a {settings.val_fraction:g} hold-out")
        self.settings, self.device, self.classes = settings, device, split.classes
        transform = center_crop_transform(img_size)
        samples = split.train + split.val
        self.images = torch.stack([transform(load_rgb(path)) for path, _ in samples])   # (N, 3, S, S)
        labels = torch.tensor([label for _, label in samples])
        self.n_train = len(split.train)
        self.train_y, self.val_y = labels[: self.n_train], labels[self.n_train:]

    def describe(self) -> str:
        return (f"k-NN monitor: {len(self.classes)} classes, {self.n_train} reference and "
                f"{len(self.val_y)} query images from {self.settings.path}, every "
                f"{self.settings.every} epoch(s)")

    @torch.no_grad()
    def features(self, encoder: torch.nn.Module) -> torch.Tensor:
        was_training = encoder.training
        encoder.eval()
        try:
            chunks = [encoder.forward_features(batch.to(self.device)).float().cpu()
                      for batch in self.images.split(self.settings.batch_size)]
        finally:
            encoder.train(was_training)
        return torch.cat(chunks)   # (N, C)

    def top1(self, encoder: torch.nn.Module) -> float:
        # An eval-mode forward draws no random numbers; the fork is the guarantee that the
        # training's generators (CPU and this device's) are where they were, whatever the encoder.
        on_accelerator = self.device.type != "cpu"
        with torch.random.fork_rng(devices=[self.device] if on_accelerator else [],
                                   device_type=self.device.type if on_accelerator else "cuda"):
            feats = self.features(encoder)
        votes = knn_scores(feats[: self.n_train], self.train_y, feats[self.n_train:], len(self.classes),
                           self.settings)
        return 100.0 * (votes.argmax(dim=1) == self.val_y).float().mean().item()

    def measure(self, encoder: torch.nn.Module, epoch: int, step: int) -> dict[str, Any]:
        """The metrics record of one measurement after `epoch` (0-based) at optimizer step `step`."""
        return {"kind": "monitor", "epoch": epoch, "step": step, "knn_top1": self.top1(encoder)}

    def floor(self, encoder: torch.nn.Module) -> dict[str, Any]:
        """The same measurement on the encoder as initialised, before its first step: what
        learning has to beat. Recorded at step 0 of a fresh run."""
        return {"kind": "monitor", "epoch": 0, "step": 0, "random_init_top1": self.top1(encoder)}
