"""Evaluation protocols on frozen features: k-NN, linear probe, few-shot; and the reports.

All work on features already extracted (`features.py`): (N, C) float tensors and (N,) labels.
Every random draw comes from a generator seeded by the evaluation seed and what it is for.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from localmim_cli.data.labelled import split_indices
from localmim_cli.seeding import derive_seed
from localmim_cli.config.schema import FewshotSettings, KnnSettings, LinearProbeSettings
from localmim_cli.errors import DataError


def _gen(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


# ---------------------------------------------------------------------------------------------
# Scores -> metrics


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is among the k highest scores; k above the class count is
    clipped to it (so "top5" of a 3-class problem is 100) and reported under its own name."""
    out: dict[str, float] = {}
    if labels.numel() == 0:
        return {f"top{k}": float("nan") for k in ks}
    num_classes = scores.shape[1]
    for k in ks:
        kk = min(k, num_classes)
        top = scores.topk(kk, dim=1).indices
        out[f"top{k}"] = 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def per_class_report(pred: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class present in the labels: images, recall (accuracy on that class),
    precision, and the class it is most often mistaken for."""
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels.long(), pred.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    rows = []
    for c, name in enumerate(classes):
        total = int(confusion[c].sum())
        if total == 0:
            continue
        predicted = int(confusion[:, c].sum())
        wrong = confusion[c].clone()
        wrong[c] = 0
        confused = int(wrong.argmax()) if int(wrong.sum()) else None
        rows.append({"class": name, "images": total, "correct": int(confusion[c, c]),
                     "accuracy": 100.0 * int(confusion[c, c]) / total,
                     "precision": 100.0 * int(confusion[c, c]) / predicted if predicted else None,
                     "most_confused_with": classes[confused] if confused is not None else None,
                     "confused_count": int(wrong.max()) if confused is not None else 0})
    return rows


def mean_ci95(values: Sequence[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% normal interval (1.96 standard errors)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    std = t.std(unbiased=True).item() if t.numel() > 1 else 0.0
    return {"mean": t.mean().item(), "ci95": 1.96 * std / math.sqrt(max(t.numel(), 1)), "std": std,
            "n": int(t.numel())}


# ---------------------------------------------------------------------------------------------
# k-NN (DINO's weighted vote)


@torch.no_grad()
def knn_scores(train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, num_classes: int,
               settings: KnnSettings, chunk: int = 1024) -> torch.Tensor:
    """(Q, num_classes) votes: each query's k most cosine-similar training features vote for
    their class with weight exp(similarity / temperature)."""
    train = F.normalize(train_f.float(), dim=1)
    query = F.normalize(query_f.float(), dim=1)
    k = min(settings.k, train.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start:start + chunk] @ train.T                       # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)                             # (q, k)
        weights = (top_sim / settings.temperature).exp()                  # (q, k)
        onehot = F.one_hot(train_y[top_idx].long(), num_classes).float()  # (q, k, C)
        out.append((onehot * weights[..., None]).sum(dim=1))              # (q, C)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


# ---------------------------------------------------------------------------------------------
# Linear probe


def train_linear_heads(x: torch.Tensor, y: torch.Tensor, num_classes: int, configs: Sequence[tuple[float, float]],
                       epochs: int, batch_size: int, seed: int) -> list[torch.nn.Linear]:
    """One linear classifier per (lr, weight decay), all trained in the same passes over x.

    AdamW, per-step cosine decay to 0, cross-entropy; each head has its own parameter group,
    so the heads do not interact. x: (N, C) features already on the device they train on.
    """
    device = x.device
    start = torch.randn(num_classes, x.shape[1], generator=_gen(seed, "linear-init")) * 0.01
    heads = []
    for _ in configs:   # the same start for every config: only lr and decay differ
        head = torch.nn.Linear(x.shape[1], num_classes).to(device)
        with torch.no_grad():
            head.weight.copy_(start.to(device))
            head.bias.zero_()
        heads.append(head)
    optimizer = torch.optim.AdamW([{"params": h.parameters(), "lr": lr, "weight_decay": wd, "base_lr": lr}
                                   for h, (lr, wd) in zip(heads, configs)])
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    order_gen = _gen(seed, "linear-order")
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss = sum(F.cross_entropy(h(xb), yb) for h in heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return heads


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature, with the training side's statistics (MAE's linear
    probe puts a non-affine BatchNorm before the head for the same reason)."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, settings: LinearProbeSettings, seed: int,
                 device: torch.device) -> dict[str, Any]:
    """Sweep lr x weight decay on a held-out part of the training features, refit the best on
    all of them, and score the validation features once with it."""
    fit_idx, hold_idx = split_indices(train_y.tolist(), settings.holdout_fraction, seed)
    if not hold_idx or not fit_idx:
        raise DataError(f"linear probe: {len(train_y)} training images are too few to hold out "
                         f"{settings.holdout_fraction:g} for the hyperparameter sweep")
    configs = [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]
    fit_x, hold_x = standardize(train_f[fit_idx].float(), train_f[hold_idx].float())
    fit_y, hold_y = train_y[fit_idx].long(), train_y[hold_idx].long()
    heads = train_linear_heads(fit_x.to(device), fit_y.to(device), num_classes, configs, settings.epochs,
                               settings.batch_size, seed)
    sweep = []
    with torch.no_grad():
        for (lr, wd), head in zip(configs, heads):
            logits = head(hold_x.to(device)).cpu()
            sweep.append({"lr": lr, "weight_decay": wd,
                          "holdout_top1": topk_accuracy(logits, hold_y, ks=(1,))["top1"],
                          "holdout_loss": F.cross_entropy(logits, hold_y).item()})
    # Accuracy first; a small held-out side ties often, and the lower loss breaks the tie.
    best = max(sweep, key=lambda r: (r["holdout_top1"], -r["holdout_loss"]))
    full_x, val_x = standardize(train_f.float(), val_f.float())
    (head,) = train_linear_heads(full_x.to(device), train_y.long().to(device), num_classes,
                                 [(best["lr"], best["weight_decay"])], settings.epochs, settings.batch_size, seed)
    with torch.no_grad():
        scores = head(val_x.to(device)).cpu()
    return {"scores": scores, "head": head, "sweep": sweep, "best": best, "fit_images": len(fit_idx),
            "holdout_images": len(hold_idx)}


# ---------------------------------------------------------------------------------------------
# Few-shot


def fewshot(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
            num_classes: int, settings: FewshotSettings, seed: int, device: torch.device) -> dict[str, Any]:
    """N-way K-shot episodes: support from the training side, queries from the validation side.

    For each shot count, `episodes` episodes each draw `way` classes (among those with enough
    images on both sides), K support and `queries` query images per class; the result is the mean
    accuracy over episodes with its 95% interval.
    """
    train_f = F.normalize(train_f.float(), dim=1)
    val_f = F.normalize(val_f.float(), dim=1)
    by_class_train = {c: (train_y == c).nonzero().flatten() for c in range(num_classes)}
    by_class_val = {c: (val_y == c).nonzero().flatten() for c in range(num_classes)}
    results = {}
    for shot in settings.shots:
        eligible = [c for c in range(num_classes)
                    if len(by_class_train[c]) >= shot and len(by_class_val[c]) >= 1]
        way = min(settings.way or len(eligible), len(eligible))
        if way < 2:
            results[f"{shot}-shot"] = {"error": f"fewer than 2 classes have {shot} training images and a "
                                                f"validation image", "way": way, "shot": shot}
            continue
        accs = []
        for episode in range(settings.episodes):
            gen = _gen(seed, "fewshot", shot, episode)
            chosen = [eligible[i] for i in torch.randperm(len(eligible), generator=gen)[:way].tolist()]
            sx, sy, qx, qy = [], [], [], []
            for new_label, c in enumerate(chosen):
                tr = by_class_train[c][torch.randperm(len(by_class_train[c]), generator=gen)[:shot]]
                va = by_class_val[c][torch.randperm(len(by_class_val[c]), generator=gen)]
                if settings.queries:
                    va = va[:settings.queries]
                sx.append(train_f[tr]), qx.append(val_f[va])
                sy.append(torch.full((len(tr),), new_label)), qy.append(torch.full((len(va),), new_label))
            sx_t, sy_t, qx_t, qy_t = torch.cat(sx), torch.cat(sy), torch.cat(qx), torch.cat(qy)
            if settings.classifier == "centroid":
                centroids = F.normalize(torch.stack([sx_t[sy_t == i].mean(0) for i in range(way)]), dim=1)
                pred = (qx_t @ centroids.T).argmax(dim=1)
            else:
                (head,) = train_linear_heads(sx_t.to(device), sy_t.to(device), way, [(0.1, 1e-3)], 100,
                                             len(sx_t), derive_seed(seed, "fewshot-fit", shot, episode))
                with torch.no_grad():
                    pred = head(qx_t.to(device)).argmax(dim=1).cpu()
            accs.append(100.0 * (pred == qy_t).float().mean().item())
        results[f"{shot}-shot"] = {"way": way, "shot": shot, "queries_per_class": settings.queries,
                                   **mean_ci95(accs)}
    return results
