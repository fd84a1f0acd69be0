"""Evaluation of classification: a fine-tuned model's own head, or probes on frozen features.

Protocols:
    classifier   a fine-tuned model's own head: top-1, top-5 and a per-class report
    knn          frozen features, cosine k-NN with DINO's weighted vote
    linear       frozen features, a linear classifier; lr and weight decay swept on a held-out
                 part of the training side, the best refit on all of it, scored once on val
    fewshot      N-way K-shot episodes over repeated seeds; mean accuracy and its 95% interval

Probes split DATA into train and validation (`--val-fraction`, seeded and stratified), or take
validation from `--val DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import DataError, UsageError

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from localmim_cli.config.schema import EvaluateSettings
    from localmim_cli.weights.encoder_weights import EncoderWeights


def native_img_size(weights: "EncoderWeights") -> int:
    if weights.shape.img_size:
        return weights.shape.img_size
    return int(weights.meta["settings"]["model"]["img_size"])


def choose_protocol(requested: str, weights: "EncoderWeights") -> str:
    if requested == "auto":
        return "classifier" if weights.has_head else "knn"
    if requested == "classifier" and not weights.has_head:
        raise UsageError(f"--protocol classifier needs a fine-tuned model with a classifier head; "
                         f"{weights.source} is a {weights.kind} encoder: use --protocol knn, linear or fewshot")
    return requested


def classifier_split(weights: "EncoderWeights", data: Path, settings: "EvaluateSettings"):
    """What a fine-tuned model is scored on, and a line saying so.

    --val DIR: that folder. DATA being the folder the run was trained on (with a held-out share):
    the same held-out images, re-derived from the run's seed. Otherwise all of DATA.
    """
    from localmim_cli.tasks.features import labelled_split

    classes = list(weights.classes or [])
    if settings.data.val_path is not None:
        split = labelled_split(data, settings.data.val_path, 0.0, settings.train.seed, classes=classes)
        return split.val, f"the images of --val {settings.data.val_path}"
    run_data = ((weights.meta.get("settings") or {}).get("data") or {})
    trained_on = run_data.get("path")
    if (weights.kind == "finetune" and trained_on and not run_data.get("val_path")
            and Path(trained_on).resolve() == Path(data).resolve() and run_data.get("val_fraction", 0) > 0):
        seed = int(weights.meta["settings"]["train"]["seed"])
        split = labelled_split(data, None, float(run_data["val_fraction"]), seed, classes=classes)
        return split.val, (f"the {run_data['val_fraction']:g} of each class the run held out "
                           f"(DATA is its training folder)")
    split = labelled_split(data, None, 0.0, settings.train.seed, classes=classes)
    return split.train, f"all {len(split.train)} images of {data}"


def evaluate(checkpoint: Path, data: Path, settings: "EvaluateSettings",
             console: "Console") -> tuple[dict[str, Any], Path | None]:
    """The results (classifier or probe) and the run directory they belong to (None: none)."""
    import torch

    from localmim_cli.engine.distributed import World, choose_device
    from localmim_cli.weights.sources import load_encoder_weights, reference_feature_model
    from localmim_cli.tasks.features import FeatureCache, cache_dir_for, features_for, labelled_split, split_record
    from localmim_cli.engine.loop import resolve_precision

    weights = load_encoder_weights(checkpoint)
    protocol = choose_protocol(settings.protocol, weights)
    device = choose_device(settings.train.device, World())
    precision = resolve_precision(settings.train.precision, device)
    img_size = settings.model.img_size or native_img_size(weights)
    results: dict[str, Any] = {
        "protocol": protocol, "checkpoint_kind": weights.kind,
        "model": weights.shape.describe() if weights.shape.depth else weights.encoder_name,
        "img_size": img_size, "crop_fraction": settings.data.eval_crop_fraction, "seed": settings.train.seed,
    }
    console.print(f"{weights.describe()}; protocol {protocol} on {device} ({precision})")

    if protocol == "classifier":
        from localmim_cli.weights.sources import classifier_model
        from localmim_cli.tasks.features import extract
        from localmim_cli.tasks.probes import per_class_report, topk_accuracy
        samples, what = classifier_split(weights, data, settings)
        if not samples:
            raise DataError(f"{data}: no images to evaluate on ({what})")
        console.print(f"scoring {len(samples)} images: {what}")
        classes = list(weights.classes or [])
        model = classifier_model(weights, img_size)
        logits, labels = extract(model, samples, img_size, settings.data.eval_crop_fraction, settings.train.batch_size,
                                 settings.data.workers, device, precision, console, label="classifying")
        results.update(topk_accuracy(logits, labels), evaluated_on=what, images=len(samples), classes=classes)
        results["per_class"] = per_class_report(logits.argmax(1), labels, classes)
    else:
        split = labelled_split(data, settings.data.val_path, settings.data.val_fraction, settings.train.seed)
        if not split.val:
            raise DataError(f"{data}: no validation images: give --val DIR or a --val-fraction above 0")
        if len(split.classes) < 2:
            raise DataError(f"{data}: only one class folder; a probe needs two or more")
        console.print(f"data: {split.describe()}")
        cache = FeatureCache(cache_dir_for(weights.run_dir), enabled=settings.cache)
        holder: dict[str, torch.nn.Module] = {}
        common = dict(batch_size=settings.train.batch_size, workers=settings.data.workers, device=device,
                      precision=precision, model_holder=holder)
        factory = lambda: reference_feature_model(weights, img_size)  # noqa: E731
        identity = weights.identity()
        train_f, train_y = features_for(factory, identity, split.train, split.classes, img_size,
                                        settings.data.eval_crop_fraction, cache, **common, console=console,
                                        label="features (train)")
        val_f, val_y = features_for(factory, identity, split.val, split.classes, img_size,
                                    settings.data.eval_crop_fraction, cache, **common, console=console,
                                    label="features (val)")
        results["data"] = split_record(split)
        results["features"] = {"dim": int(train_f.shape[1]), "cache": str(cache.folder) if settings.cache else None,
                               "cache_hits": cache.hits}
        results.update(_run_probe(protocol, train_f, train_y, val_f, val_y, split.classes, settings, device))
    return results, weights.run_dir


def _run_probe(protocol: str, train_f, train_y, val_f, val_y, classes: list[str], settings: "EvaluateSettings",
               device: "torch.device") -> dict[str, Any]:
    from localmim_cli.tasks import probes
    n = len(classes)
    if protocol == "knn":
        scores = probes.knn_scores(train_f.to(device), train_y.to(device), val_f.to(device), n, settings.knn).cpu()
        return {**probes.topk_accuracy(scores, val_y), "knn": settings.knn.model_dump(),
                "per_class": probes.per_class_report(scores.argmax(1), val_y, classes)}
    if protocol == "linear":
        fit = probes.linear_probe(train_f, train_y, val_f, val_y, n, settings.linear, settings.train.seed, device)
        return {**probes.topk_accuracy(fit["scores"], val_y), "linear": settings.linear.model_dump(),
                "best": fit["best"], "sweep": fit["sweep"], "fit_images": fit["fit_images"],
                "holdout_images": fit["holdout_images"],
                "per_class": probes.per_class_report(fit["scores"].argmax(1), val_y, classes)}
    if protocol == "fewshot":
        return {"fewshot": probes.fewshot(train_f, train_y, val_f, val_y, n, settings.fewshot, settings.train.seed,
                                          device), "fewshot_settings": settings.fewshot.model_dump()}
    raise ValueError(f"unknown protocol {protocol!r}")


def print_table(results: dict[str, Any], console: "Console") -> None:
    from rich.table import Table

    protocol = results["protocol"]
    summary = Table(title=f"{protocol}: {results['checkpoint']}")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    if protocol == "fewshot":
        for name, r in results["fewshot"].items():
            if "error" in r:
                summary.add_row(name, r["error"])
            else:
                summary.add_row(f"{r['way']}-way {name} ({r['n']} episodes)",
                                f"{r['mean']:.2f}% ± {r['ci95']:.2f}")
    else:
        for key in ("top1", "top5"):
            if key in results:
                summary.add_row(key.replace("top", "top-"), f"{results[key]:.2f}%")
        if protocol == "linear":
            best = results["best"]
            summary.add_row("best lr / weight decay", f"{best['lr']:g} / {best['weight_decay']:g}")
            summary.add_row("held-out top-1 of best", f"{best['holdout_top1']:.2f}%")
        if protocol == "knn":
            summary.add_row("k / temperature", f"{results['knn']['k']} / {results['knn']['temperature']:g}")
    console.print(summary)
    rows = results.get("per_class") or []
    if rows:
        table = Table(title="per class" + (f" (first 50 of {len(rows)}; all in the JSON)" if len(rows) > 50 else ""))
        for col, justify in (("class", "left"), ("images", "right"), ("accuracy", "right"),
                             ("precision", "right"), ("most confused with", "left")):
            table.add_column(col, justify=justify)
        for r in rows[:50]:
            table.add_row(r["class"], str(r["images"]), f"{r['accuracy']:.1f}%",
                          "-" if r["precision"] is None else f"{r['precision']:.1f}%",
                          f"{r['most_confused_with']} ({r['confused_count']})" if r["most_confused_with"] else "-")
        console.print(table)
