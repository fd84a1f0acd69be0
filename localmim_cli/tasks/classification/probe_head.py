"""LP-FT's start (Kumar et al. 2022): a fresh run's fc_norm and head from a linear probe.

A new head of random weights sends random gradients into the encoder for the first steps and
distorts features that a small set cannot rebuild; a head fitted on the frozen features first lets
fine-tuning start from the probe's accuracy and improve on it. The probe is fitted on what the
head actually sees: the classifier's own pooled features through fc_norm (a LayerNorm, still
at weight 1 and bias 0), taken from the training images at the evaluation crop. The linear
probe (tasks/probes.py, the same sweep as `localmim evaluate --protocol linear`) standardises
each feature with the training images' mean and std before its head; fc_norm's affine takes that
standardisation over (weight 1/std, bias -mean/std) and the head takes the probe's weights, so
the model's logits are the probe's. A model without an fc_norm (an encoder plugin's timm model,
e.g. Hiera) has the standardisation folded into its classifier instead: weight W/std, bias
b - W mean/std, the same logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from localmim_cli.config.schema import FinetuneSettings
    from localmim_cli.engine.loop import Placement
    from localmim_cli.tasks.features import LabelledSplit


def fit_probe_head(model: "torch.nn.Module", settings: "FinetuneSettings", split: "LabelledSplit", img_size: int,
                   placement: "Placement") -> dict[str, Any]:
    """Fit and load the probe into model.fc_norm and model.head; what it scored."""
    import torch

    from localmim_cli.config.schema import LinearProbeSettings
    from localmim_cli.tasks import probes
    from localmim_cli.errors import UsageError
    from localmim_cli.tasks.features import extract

    classifier = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(classifier, torch.nn.Linear):
        raise UsageError("model.head_init linear_probe needs a model whose classifier is one linear layer; "
                         "this one's is not: set it to trunc_normal")
    fc_norm = getattr(model, "fc_norm", None)
    fc_norm = fc_norm if isinstance(fc_norm, torch.nn.LayerNorm) and fc_norm.elementwise_affine else None
    device, batch = placement.device, settings.train.eval_batch_size or settings.train.batch_size
    crop, workers = settings.data.eval_crop_fraction, settings.data.workers
    pre_logits = _pre_logits(model)
    was_training = model.training
    with torch.no_grad():
        train_f, train_y = extract(pre_logits, split.train, img_size, crop, batch, workers, device,
                                   placement.precision)
        val_f, val_y = extract(pre_logits, split.val, img_size, crop, batch, workers, device, placement.precision) \
            if split.val else (train_f[:0], train_y[:0])
    model.train(was_training)
    # The probe's heads draw their start from torch's global generator: leave the run's untouched.
    with torch.random.fork_rng(devices=[]):
        fit = probes.linear_probe(train_f, train_y, val_f, val_y, len(split.classes), LinearProbeSettings(),
                                  settings.train.seed, device)
    mean, std = train_f.mean(dim=0), train_f.std(dim=0).clamp_min(1e-6)   # probes.standardize's
    weight, bias = fit["head"].weight.detach().to(mean), fit["head"].bias.detach().to(mean)
    with torch.no_grad():
        if fc_norm is not None:
            fc_norm.weight.copy_((1 / std).to(fc_norm.weight))
            fc_norm.bias.copy_((-mean / std).to(fc_norm.bias))
        else:
            weight, bias = weight / std, bias - (weight / std) @ mean
        classifier.weight.copy_(weight.to(classifier.weight))
        classifier.bias.copy_(bias.to(classifier.bias))
    record = {"lr": fit["best"]["lr"], "weight_decay": fit["best"]["weight_decay"],
              "holdout_top1": fit["best"]["holdout_top1"]}
    if split.val:
        record["val_top1"] = probes.topk_accuracy(fit["scores"], val_y, ks=(1,))["top1"]
    return record


def head_start_line(record: dict[str, Any]) -> str:
    val = f", val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else ""
    return (f"head starts from a linear probe (lr {record['lr']:g}, weight decay {record['weight_decay']:g}; "
            f"held-out top-1 {record['holdout_top1']:.2f}%{val})")


def _pre_logits(model: "torch.nn.Module") -> "torch.nn.Module":
    """The classifier up to its head: pooled features through fc_norm (and head_drop)."""
    import torch

    class PreLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    return PreLogits()
