"""`localmim visualize`: what every scale's local decoder predicts, drawn next to its target.

(A fine-tuning run gets its task's figure instead: tasks/task_figure.py picks it by the task the
checkpoint records. What follows is the pretraining figure.)

checkpoint -> model with its decoders -> images (centre crop, model size) -> a mask per image
(seeded noise, or a saved mask) -> one forward per image -> per scale: target and prediction
drawn by the target plugin, the loss of that scale -> one PNG grid + a JSON sidecar.

Masks are reproducible: image i's noise comes from a CPU torch.Generator seeded with
derive_seed(seed, "visualize", i), so the same seed gives the same mask on every run and device;
the sidecar records each mask, and `--mask-from` replays it.

"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

    from localmim_cli.model.localmim import LocalMIM
    from localmim_cli.weights.locate import TensorFile
    from localmim_cli.data.prepared import PreparedImage

DEFAULT_FIGURE = "reconstruction.png"
MIN_PANEL_PX = 128
MAX_IMAGES = 64   # rows in one figure
PASTE_NOTE = "Pasted panels: visible patches are the input pixels, hidden patches the prediction."
LOSS_NOTE = "Loss: masked mean squared error of each scale on this image (hidden cells only)."


def _refuse_without_decoders(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {why}, so it has no pretraining decoders. `visualize` draws what each LocalMIM "
        "decoder predicts, which needs the decoders saved during pretraining (exported encoders "
        "and fine-tuned models leave them out). Pass the pretraining run directory instead (or "
        "one of its checkpoints/step-N folders), or a published LocalMIM pretraining checkpoint "
        "that holds decoder.* weights.")


def _describe_encoder_only(state: dict) -> str:
    keys = sorted(state)
    if any(k.startswith(("head.", "fc_norm.")) for k in keys):
        return f"it holds a classification model ({len(keys)} tensors, with a head: a fine-tuned model)"
    return f"it holds only encoder weights ({len(keys)} tensors such as {keys[0]!r})" if keys else "it is empty"


def load_for_visualize(path: Path | str) -> tuple["LocalMIM", dict[str, Any], str]:
    """(model in eval mode on the CPU, settings dict with a "model" entry, where it came from).

    Takes what weights/locate.py recognises and has decoders: a pretraining run, checkpoint or
    its model.safetensors, or a published LocalMIM ViT or Swin pretraining checkpoint (authors'
    key layout, .pth or .safetensors). Anything without decoders (an exported encoder, a
    fine-tuned model, MAE's encoder) is refused with a CheckpointError saying what to pass.
    """
    from localmim_cli.engine import checkpoints
    from localmim_cli.weights.loading import read_safetensors
    from localmim_cli.weights.locate import CheckpointFolder, ExportFolder, locate, without_meta

    found = locate(path)
    if isinstance(found, CheckpointFolder):
        if found.kind != "pretrain":
            init = found.meta.get("init")
            init = init.get("source") if isinstance(init, dict) else init
            why = f"its meta.json says it is a {found.kind!r} checkpoint" + (f" (initialised from {init})" if init else "")
            raise _refuse_without_decoders(found.folder, why)
        return _load_ours(checkpoints.load(found.folder))
    if isinstance(found, ExportFolder):
        model_file = found.folder / "model.safetensors"
        raise _refuse_without_decoders(model_file, _describe_encoder_only(read_safetensors(model_file)))
    if found.layout in ("localmim_vit", "localmim_swin"):
        return _load_published(found)
    if found.layout == "ours" and any(k.startswith("decoders.") for k in found.state):
        raise without_meta(found.path)
    raise _refuse_without_decoders(found.path, _describe_encoder_only(found.state))


def _load_ours(ckpt) -> tuple["LocalMIM", dict[str, Any], str]:
    from localmim_cli.model.build import build_model
    from localmim_cli.config.schema import ModelSettings
    from localmim_cli.weights.loading import load_exactly

    meta = ckpt.meta
    state = ckpt.model_state()
    if not any(k.startswith("decoders.") for k in state):
        raise _refuse_without_decoders(ckpt.model_file, _describe_encoder_only(state))
    settings = meta.get("settings")
    if not isinstance(settings, dict) or "model" not in settings:
        raise CheckpointError(f"{ckpt.path / 'meta.json'}: no model settings recorded; cannot rebuild the model")
    model = build_model(ModelSettings.model_validate(settings["model"]))
    load_exactly(model, state, ckpt.model_file)
    position = meta.get("position") or {}
    where = ", ".join(f"{k} {position[k]}" for k in ("epoch", "step") if k in position)
    return model.eval(), settings, f"{ckpt.path} (pretraining checkpoint{', ' + where if where else ''})"


def _load_published(found: "TensorFile") -> tuple["LocalMIM", dict[str, Any], str]:
    """A published LocalMIM pretraining checkpoint, its settings read off the file."""
    from localmim_cli.model.build import build_model
    from localmim_cli.weights.published import load_published_into, settings_from_published
    from localmim_cli.weights.published_swin import load_published_swin_into, settings_from_published_swin

    if found.layout == "localmim_swin":
        settings = settings_from_published_swin(found.state, found.args, str(found.path))
        model = build_model(settings)
        load_published_swin_into(model, found.state, str(found.path))
        what = "published LocalMIM Swin checkpoint"
    else:
        settings = settings_from_published(found.state, found.args, found.path)
        model = build_model(settings)
        load_published_into(model, found.state).raise_if_incomplete(found.path)
        what = "published LocalMIM checkpoint"
    return model.eval(), {"model": settings.model_dump(mode="json")}, f"{found.path} ({what}, authors' key layout)"


# -- masks ------------------------------------------------------------------------------------


def mask_noise(seed: int, index: int, num_units: int) -> "torch.Tensor":
    """Image `index`'s masking noise (num_units,), drawn on the CPU: the same on every device."""
    import torch

    from localmim_cli.seeding import derive_seed

    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "visualize", index))
    return torch.rand(num_units, generator=generator)


def seeded_masks(seed: int, n_images: int, num_units: int, mask_ratio: float) -> "torch.Tensor":
    """(n_images, L) masks, 1 = hidden; MAE's rule: the units with the smallest noise stay visible."""
    import torch

    from localmim_cli.model.masking import masking_from_noise

    if not 0 < mask_ratio < 1:
        raise UsageError(f"--mask-ratio {mask_ratio}: must be between 0 and 1 (exclusive)")
    noise = torch.stack([mask_noise(seed, i, num_units) for i in range(n_images)])
    return masking_from_noise(noise, mask_ratio).mask


def read_mask_file(path: Path, n_images: int, num_units: int, mask_ratio: float | None = None) -> "torch.Tensor":
    """Masks from a previous figure's JSON sidecar, or a .json/.npy holding (L,) or (N, L) 0/1 values.

    One mask is used for every image; N masks need N images. Returns (n_images, L) float, 1 = hidden.
    """
    import numpy as np
    import torch

    from localmim_cli.model.masking import keep_count

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--mask-from {path}: no such file")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                if not isinstance(data.get("images"), list):
                    raise UsageError("a JSON object must be a visualize sidecar with an 'images' list")
                data = [item["mask"] for item in data["images"]]
            values = np.asarray(data, dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--mask-from {path}: unreadable mask ({exc})") from None
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[1] != num_units:
        raise UsageError(f"--mask-from {path}: expected ({num_units},) or (N, {num_units}) values for this "
                         f"model's {num_units} patches, found shape {tuple(values.shape)}")
    if not np.isin(values, (0, 1)).all():
        raise UsageError(f"--mask-from {path}: mask values must be 0 (visible) or 1 (hidden)")
    if values.shape[0] == 1:
        values = np.repeat(values, n_images, axis=0)
    elif values.shape[0] != n_images:
        raise UsageError(f"--mask-from {path}: holds {values.shape[0]} masks for {n_images} images; "
                         "give one mask, or one per image")
    hidden = values.sum(axis=1)
    if (hidden == 0).any() or (hidden == num_units).any():
        raise UsageError(f"--mask-from {path}: every mask must hide some patches and leave some visible")
    if mask_ratio is not None:
        expected = num_units - keep_count(num_units, mask_ratio)
        if (hidden != expected).any():
            raise UsageError(f"--mask-from {path}: masks hide {sorted(set(hidden.astype(int).tolist()))} "
                             f"of {num_units} patches, but --mask-ratio {mask_ratio} hides {expected}; "
                             "leave out --mask-ratio to use the file's masks as they are")
    return torch.from_numpy(values.astype(np.float32))


# -- running the model and drawing ---------------------------------------------------------------


@dataclass
class ScaleResult:
    cell_px: int
    layer: int
    loss: float
    target: Any   # (h, w, dim) tensor
    pred: Any     # (h, w, dim) tensor


@dataclass
class ImageResult:
    image: "PreparedImage"
    mask: list[int]
    scales: list[ScaleResult] = field(default_factory=list)


def reconstruct(model: "LocalMIM", images: list["PreparedImage"], masks: "torch.Tensor") -> list[ImageResult]:
    """One forward per image with its own mask, in float32 with gradients off, on the model's device."""
    import torch

    device = next(model.parameters()).device
    results = []
    for image, mask in zip(images, masks):
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            out = model(image.tensor[None].to(device), mask=mask[None].to(device))
        result = ImageResult(image, [int(v) for v in mask.tolist()])
        side = image.pixels.shape[0]
        for k, cell in enumerate(model.cells_px):
            grid = side // cell
            result.scales.append(ScaleResult(
                cell, model.encoder.tap_layers[k], float(out.losses[k]),
                out.targets[k][0].float().cpu().reshape(grid, grid, -1),
                out.preds[k][0].float().cpu().reshape(grid, grid, -1)))
        results.append(result)
    return results


def _draw(target, cells, cell_px: int, image, zoom: int):
    """The target's drawing of (h, w, dim) cells, and whether it has one (else a grey map of
    vector lengths). zoom goes only to targets that ask for more than a cell's pixels."""
    from localmim_cli.tasks.figure import vector_length_map

    try:
        if zoom > 1:
            return target.render(cells, cell_px, image, zoom=zoom), True
        return target.render(cells, cell_px, image), True
    except NotImplementedError:
        return vector_length_map(cells.numpy(), cell_px), False


def build_rows(model: "LocalMIM", results: list[ImageResult]):
    """Panels per image: input | masked input | per scale: target | prediction [| pasted]."""
    from localmim_cli.targets.base import zoom_for
    from localmim_cli.tasks.figure import Panel, masked_view, paste_visible

    unit_px, grid = model.encoder.unit_px, model.encoder.unit_grid
    target = model.target
    zoom = zoom_for(target.min_draw_px, model.cells_px)  # one for all scales: panels line up
    tap_unit = model.encoder.tap_unit
    rows, drawable = [], True
    for result in results:
        img = result.image
        hidden = sum(result.mask)
        row = [Panel(img.pixels, ["input", img.path.name], "input"),
               Panel(masked_view(img.pixels, result.mask, grid, unit_px),
                     ["masked input", f"{hidden} of {len(result.mask)} patches hidden"], "masked")]
        for k, s in enumerate(result.scales):
            target_px, ok_t = _draw(target, s.target, s.cell_px, img.tensor, zoom)
            pred_px, ok_p = _draw(target, s.pred, s.cell_px, img.tensor, zoom)
            drawable &= ok_t and ok_p
            row.append(Panel(target_px, [f"scale {k + 1} target", f"{tap_unit} {s.layer}, {s.cell_px} px cells"],
                             f"scale{k}.target"))
            row.append(Panel(pred_px, [f"scale {k + 1} prediction", f"loss {s.loss:.4f}"], f"scale{k}.prediction"))
            if target.draws_pixels and ok_p and pred_px.shape == img.pixels.shape:
                row.append(Panel(paste_visible(pred_px, img.pixels, result.mask, grid, unit_px),
                                 [f"scale {k + 1} pasted", "visible = input"], f"scale{k}.pasted"))
        rows.append(row)
    return rows, drawable


def figure_notes(target, target_name: str, drawable: bool) -> list[str]:
    """What the figure's drawings mean, in the target's own words where it gives them."""
    if not drawable:
        drawing = f"Target {target_name!r}: drawn by its plugin (it has no drawing: each cell's vector length)"
    else:
        drawing = target.legend or f"Target {target_name!r}: drawn by its plugin"
    return [drawing, *([PASTE_NOTE] if target.draws_pixels and drawable else []), LOSS_NOTE]


def write_figure(model: "LocalMIM", images: list["PreparedImage"], masks: "torch.Tensor", out_png: Path,
                 *, source: str, target_name: str, seed: int | None = None,
                 mask_ratio: float | None = None, mask_from: Path | None = None,
                 header: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run, draw, and write out_png and its sidecar (same name, .json), atomically. Returns the sidecar."""
    from localmim_cli.engine import atomic
    from localmim_cli.engine.outputs import WRITTEN_BY, mark
    from localmim_cli.tasks.figure import compose, png_bytes

    out_png = Path(out_png)
    results = reconstruct(model, images, masks)
    rows, drawable = build_rows(model, results)
    notes = figure_notes(model.target, target_name, drawable)
    if mask_from is None and mask_ratio is None:
        mask_ratio = model.mask_ratio
    mask_text = f"masks from {mask_from.name}" if mask_from else f"seed {seed}, mask ratio {mask_ratio:g}"
    lines = ([header] if header else []) + [f"{source}", f"target {target_name}; {mask_text}", *notes]
    panel_px = max(max(p.pixels.shape[:2]) for row in rows for p in row)
    panel_px *= -(-MIN_PANEL_PX // panel_px)  # small models: whole-number zoom to a legible size
    figure, layout = compose(rows, panel_px, lines)
    sidecar = {
        WRITTEN_BY: mark("visualize"),   # what lets a later --overwrite replace this figure
        "figure": out_png.name,
        "checkpoint": None,
        "source": source,
        "target": target_name,
        "seed": None if mask_from else seed,
        "mask_ratio": mask_ratio,
        "mask_from": str(mask_from) if mask_from else None,
        "img_size": int(images[0].pixels.shape[0]) if images else None,
        "unit_px": model.encoder.unit_px,
        "mask_grid": list(model.encoder.unit_grid),
        "cells_px": list(model.cells_px),
        "tap_layers": list(model.encoder.tap_layers),
        "tap_unit": model.encoder.tap_unit,
        "scales": list(model.scales),
        "notes": notes,
        "layout": {**layout.as_dict(), "panels": [p.name for p in rows[0]]},
        "images": [{"path": str(r.image.path), "mask": r.mask, "hidden": sum(r.mask),
                    "losses": [s.loss for s in r.scales], "loss": sum(s.loss for s in r.scales)}
                   for r in results],
        **(extra or {}),
    }
    atomic.write_bytes(out_png, png_bytes(figure, {WRITTEN_BY: mark("visualize")}))
    atomic.write_json(out_png.with_suffix(".json"), sidecar)
    return sidecar


def prepare_images(paths: list[Path], size: int) -> list["PreparedImage"]:
    from localmim_cli.data.prepared import prepare_image
    return [prepare_image(p, size) for p in paths]


def write_progress_figure(model, image_paths: list[Path], out_png: Path, seed: int,
                          *, target_name: str, title: str | None = None) -> dict[str, Any]:
    """A reconstruction figure of the model as it trains (call every N epochs, on the main process).

    Fixed images and masks (seeded as `visualize --seed` seeds them, at the model's mask ratio),
    so figures from different epochs differ only by what the model learnt. Runs in float32 with
    gradients off and puts the model back into the mode it was in. Returns the sidecar.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    was_training = model.training
    model.eval()
    try:
        side = model.encoder.unit_grid[0] * model.encoder.unit_px
        images = prepare_images(list(image_paths), side)
        masks = seeded_masks(seed, len(images), model.num_units, model.mask_ratio)
        return write_figure(model, images, masks, Path(out_png), source=title or "training progress",
                            target_name=target_name, seed=seed, mask_ratio=model.mask_ratio)
    finally:
        model.train(was_training)


def default_out(checkpoint: Path, overwrite: bool = False, name: str = DEFAULT_FIGURE) -> Path:
    """RUN/figures/NAME for a run directory, else ./NAME (reconstruction.png, or a task figure's
    name); when that figure (or its sidecar) exists, the first free NAME-N.png, as evaluate names
    its results: a rerun never replaces an earlier figure unless --overwrite says so."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and (checkpoint / "checkpoints").is_dir():
        first = checkpoint / "figures" / name
    else:
        first = Path.cwd() / name
    path, n = first, 1
    while not overwrite and (path.exists() or path.with_suffix(".json").exists()):
        n += 1
        path = first.with_name(f"{first.stem}-{n}{first.suffix}")
    return path


def check_out(out: Path, overwrite: bool) -> None:
    """The figure and its sidecar may be written at `out` (engine/outputs.py: a new file, or, with
    --overwrite, an earlier figure of localmim's; never inside checkpoints); a PNG name."""
    from localmim_cli.engine import outputs

    outputs.check_file(out, outputs.FIGURE, overwrite)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the figure is a PNG; name it FIG.png (its sidecar FIG.json goes beside it)")
    outputs.check_file(out.with_suffix(".json"), outputs.FIGURE_SIDECAR, overwrite,
                       flag=f"--out {out}: its sidecar")




# the figure flags (their Python names) that the reconstruction figure takes; a task's figure names its own
RECONSTRUCTION_OPTIONS = frozenset({"seed", "mask_from", "mask_ratio"})
FLAGS = {"seed": "--seed", "mask_from": "--mask-from", "mask_ratio": "--mask-ratio",
         "score_threshold": "--score-threshold"}


def visualize(checkpoint: Path | str, images: list[Path | str] | None = None, out: Path | str | None = None,
              seed: int | None = None, mask_from: Path | str | None = None, mask_ratio: float | None = None,
              device: str = "cpu", overwrite: bool = False,
              score_threshold: float | None = None) -> tuple[Path, dict[str, Any]]:
    """Draw what the checkpoint's model does on the images: for a pretraining checkpoint what
    every scale reconstructs (input, mask, and per scale the target next to the prediction); for
    a fine-tuning run, its task's figure (tasks/task_figure.py: a segmenter's prediction and
    ground truth, a detector's boxes).

    Writes one PNG (a row per image) and a JSON sidecar; returns (the PNG's path, the sidecar's
    content). An existing `out` is replaced only when it is an earlier figure of localmim's and
    `overwrite` is set.
    """
    from localmim_cli.tasks.task_figure import FigureRequest, figure_for

    checkpoint = Path(checkpoint)
    figure = figure_for(checkpoint)
    given = {k: v for k, v in (("seed", seed), ("mask_from", mask_from), ("mask_ratio", mask_ratio),
                               ("score_threshold", score_threshold)) if v is not None}
    accepted = figure.options if figure is not None else RECONSTRUCTION_OPTIONS
    if foreign := [FLAGS[k] for k in given if k not in accepted]:
        what = figure.what if figure is not None else "a pretraining run's reconstruction figure"
        raise UsageError(f"{', '.join(foreign)}: not an option of {what} ({checkpoint}); "
                         f"it takes {', '.join(FLAGS[k] for k in sorted(accepted)) or 'none of the figure flags'}")
    out = Path(out) if out is not None else default_out(checkpoint, overwrite,
                                                        figure.default_name if figure else DEFAULT_FIGURE)
    check_out(out, overwrite)
    paths = image_paths(images)
    torch_device = parse_device(device)
    if figure is not None:
        return out, figure.draw(FigureRequest(checkpoint, paths, out, torch_device, given))
    return out, _reconstruction(checkpoint, paths, out, seed, mask_from, mask_ratio, torch_device)


def image_paths(images: list[Path | str] | None) -> list[Path]:
    """The image files given (folders searched), or the built-in sample photos; at most MAX_IMAGES."""
    from localmim_cli.data.prepared import find_images

    if images:
        paths = find_images([Path(p) for p in images])
    else:
        from localmim_cli.data.sample_photos import sample_photo_paths
        paths = sample_photo_paths()
    if len(paths) > MAX_IMAGES:
        raise UsageError(f"IMAGES: {len(paths)} images found; one figure holds at most {MAX_IMAGES} rows, "
                         "pass fewer files or a smaller folder")
    return paths


def parse_device(device: str) -> "torch.device":
    import torch

    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r}: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch_device


def _reconstruction(checkpoint: Path, paths: list[Path], out: Path, seed: int | None, mask_from: Path | str | None,
                    mask_ratio: float | None, torch_device: "torch.device") -> dict[str, Any]:
    """The pretraining figure: what every scale reconstructs under seeded or replayed masks."""
    mask_from = Path(mask_from) if mask_from is not None else None
    if mask_from is not None and seed is not None:
        raise UsageError("give --seed or --mask-from, not both: --mask-from replays saved masks")
    seed = 0 if seed is None else seed
    model, settings, source = load_for_visualize(checkpoint)
    prepared = prepare_images(paths, settings["model"]["img_size"])
    if mask_from is not None:
        masks = read_mask_file(mask_from, len(prepared), model.num_units, mask_ratio)
    else:
        masks = seeded_masks(seed, len(prepared), model.num_units,
                             model.mask_ratio if mask_ratio is None else mask_ratio)
    ratio = None if mask_from is not None else (model.mask_ratio if mask_ratio is None else mask_ratio)
    model.to(torch_device)
    return write_figure(model, prepared, masks, out, source=source,
                        target_name=settings["model"]["target"]["name"],
                        seed=None if mask_from is not None else seed, mask_ratio=ratio,
                        mask_from=mask_from, extra={"checkpoint": str(checkpoint), "device": str(torch_device)})
