"""The settings of a run: one pydantic model tree, unknown keys refused.

Values arrive in layers (see `layers.py`); this module only says what is valid. Plugin options
(`model.encoder.options`, `model.target.options`) are validated by the plugin's own model once
the plugin is known, so a third-party encoder's options are checked as strictly as ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator



def _crop_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {value}")
    return value


# RandomResizedCrop's range of crop areas, as a share of the image.
CropScale = Annotated[tuple[float, float], AfterValidator(_crop_range)]


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError(f"device {value!r} is not one of auto, cpu, mps, cuda, cuda:N")
    return value


# Where a run computes; whether a GPU is really there is checked when the run starts.
Device = Annotated[str, AfterValidator(_device)]


# Far beyond any usable lr; much larger ones overflow the optimizer's float32 step arithmetic.
MAX_LR = 1e30

# Upper bounds of counts: far beyond any real run, low enough that a slip (a pasted number, keys
# held down) is refused at once instead of planning 10^22 epochs or forking a million workers.
MAX_EPOCHS = 100_000        # epochs, and epochs between events (the paper's longest run: 1600)
MAX_STEPS = 1_000_000_000   # optimizer steps between events (logging, checkpoints)
MAX_BATCH = 1_000_000       # images per device per micro-step, or per forward
MAX_ACCUM = 100_000         # micro-steps per optimizer step
MAX_WORKERS = 1024          # loader processes, CPU threads
MAX_REPEATS = 100_000       # passes over a folder per epoch
MAX_KEEP = 100_000          # checkpoints kept
MAX_IMG_SIZE = 16_384       # pixels on a side
SEED_RANGE = {"ge": -2**63, "le": 2**63 - 1}   # what torch.manual_seed takes (a 64-bit integer)


def _min_lr_below_lr(optim):
    """An absolute optim.lr (when given) must stay above the floor optim.min_lr."""
    if optim.lr is not None and optim.min_lr > optim.lr:
        raise ValueError(f"optim.min_lr {optim.min_lr} is above optim.lr {optim.lr}: the cosine schedule "
                         "would rise; lower min_lr")
    return optim


class Strict(BaseModel):
    # Infinity and NaN are no setting's sensible value: `optim.base_lr=Infinity` would train to NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _compile_mode(value: Any) -> Any:
    # true / false read as the default mode / off, so `--set train.compile=true` works
    if isinstance(value, bool):
        return "default" if value else "off"
    return value


CompileMode = Annotated[Literal["off", "default", "max-autotune"], BeforeValidator(_compile_mode)]


class SpeedSettings(Strict):
    """How a training step runs fast, without changing what it computes (beyond rounding)."""

    compile: CompileMode = Field(
        "off", description="torch.compile the model: off, default or max-autotune (true = default); "
                           "if compiling fails the run says so in one line and continues eagerly")
    activation_checkpointing: bool = Field(
        False, description="recompute each encoder block's activations in the backward pass instead "
                           "of keeping them: less memory (ViT-L/H at large batches), about a third "
                           "more compute; same losses and gradients")
    threads: int = Field(0, ge=0, le=MAX_WORKERS, description="intra-op CPU threads of the step; 0 = the cores the loader "
                                              "workers leave, at least 1 (OMP_NUM_THREADS, when set, wins)")


# What a resume may change among them: the same computation, run differently. Not train.fsdp:
# sharded runs save their optimizer state keyed by parameter name, replicated ones by number.
RESUMABLE_SPEED_SETTINGS = {"train.compile", "train.activation_checkpointing", "train.threads"}


class PluginChoice(Strict):
    name: str = Field(description="entry-point name of the plugin (see `localmim plugins list`)")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the plugin")


class DecoderSettings(Strict):
    width: Annotated[int, Field(ge=8)] | list[Annotated[int, Field(ge=8)]] = Field(
        256, description="decoder embedding width, or one per tap (published ViT: 256; Swin-B: "
                         "[64, 128, 128, 128])")
    depth: int = Field(1, ge=1, description="transformer blocks per decoder (published: 1)")
    num_heads: int = Field(8, ge=1, description="attention heads (published ViT: 8)")
    mlp_ratio: float = Field(4.0, gt=0)


class ModelSettings(Strict):
    encoder: PluginChoice = Field(default_factory=lambda: PluginChoice(name="vit"))
    target: PluginChoice = Field(default_factory=lambda: PluginChoice(name="hog"))
    img_size: int = Field(224, ge=8, le=MAX_IMG_SIZE, description="square input side in pixels")
    taps: list[int] | None = Field(None, description="1-indexed encoder layers that get a decoder; "
                                                     "empty = the encoder's default (ViT: 2, 4, L-2, L)")
    scales: list[float] = Field([4.0, 2.0, 1.0, 0.5], description="resolution factor of each "
                                "decoder's prediction relative to its tap grid, one per tap")
    decoder: DecoderSettings = Field(default_factory=DecoderSettings)
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches hidden")
    layer_norm_eps: float = Field(1e-6, gt=0)


class DataSettings(Strict):
    path: Path | None = Field(None, description="image folder (recursive), one image, a text list of image paths, or tar shards (a .tar, a folder of them, or shards-{000..009}.tar); empty = built-in sample photos")
    crop_scale: CropScale = Field((0.2, 1.0), description="RandomResizedCrop area range")
    hflip: bool = Field(True, description="random horizontal flip")
    workers: int = Field(2, ge=0, le=MAX_WORKERS, description="loader processes per device")
    skip_unreadable: bool = Field(False, description="skip files that fail to decode (counted in the log) "
                                                     "instead of stopping")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="passes over the folder per epoch (small folders)")
    check: Literal["header", "full", "none"] = Field(
        "header", description="before the first run of a data folder: open every header (header), "
                              "decode every image (full) or trust the files (none)")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where JPEGs are decoded: gpu (nvJPEG, batched; CUDA only), cpu (loader "
                            "workers), auto = gpu when training on CUDA")


class OptimSettings(Strict):
    base_lr: float = Field(1.5e-4, gt=0, le=MAX_LR, description="lr per 256 images; "
                           "lr = base_lr * effective batch / 256")
    lr: float | None = Field(None, gt=0, le=MAX_LR, description="absolute lr; overrides base_lr scaling when set")
    min_lr: float = Field(0.0, ge=0, description="floor of the cosine schedule")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay; norms and biases are excluded")
    betas: tuple[float, float] = Field((0.9, 0.95))
    warmup_epochs: float = Field(40, ge=0, description="linear warmup, per step")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm; empty = no clipping")

    _floor_below_peak = model_validator(mode="after")(_min_lr_below_lr)


class KnnSettings(Strict):
    k: int = Field(20, ge=1, le=MAX_BATCH, description="neighbours that vote (DINO: 20)")
    temperature: float = Field(0.07, gt=0, description="votes weigh exp(cosine / temperature) (DINO: 0.07)")


class MonitorSettings(KnnSettings):
    """The online k-NN monitor of a pretraining run (off while `path` is empty)."""

    path: Path | None = Field(None, description="labelled folder (one subfolder per class) to score "
                                                "frozen features on; empty = no monitor")
    every: int = Field(1, ge=1, le=MAX_EPOCHS, description="epochs between measurements")
    val_fraction: float = Field(0.3, gt=0, lt=1, description="share of each class used as queries; "
                                                             "the rest vote")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="images per forward")


def loggers_field():
    return Field(default_factory=lambda: ["tensorboard"], description="where metrics go besides "
                 "metrics.jsonl: tensorboard, mlflow, wandb, or a plugin of group localmim.loggers; "
                 "[] = metrics.jsonl only")


class TrainingRunSettings(SpeedSettings):
    """What every training command's `train` section shares: where and how precisely the step runs,
    how it accumulates, what is kept and logged. Each command adds its length, batch and cadence."""

    accum_steps: int = Field(1, ge=1, le=MAX_ACCUM, description="micro-steps per optimizer step")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPUs that have it, fp16 (with loss scaling) on older "
                            "GPUs, fp32 on CPUs")
    device: Device = Field("auto", description="auto, cpu, mps, cuda, cuda:N")
    keep_last: int = Field(2, ge=1, le=MAX_KEEP, description="checkpoints kept")
    loggers: list[str] = loggers_field()


class TrainSettings(TrainingRunSettings):
    fsdp: bool = Field(False, description="under torchrun with 2+ processes: shard parameters, gradients "
                                          "and optimizer state per encoder block (FSDP2) instead of "
                                          "replicating them (DDP); checkpoints stay whole. Not with "
                                          "visualize_every (figures come from the main process alone)")
    epochs: int = Field(1600, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="images per device per micro-step")
    seed: int = Field(0, **SEED_RANGE, description="run seed; crops, flips and masks derive from it per sample")
    log_every: int = Field(20, ge=1, le=MAX_STEPS, description="optimizer steps between logged metrics")
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS, description="optimizer steps between checkpoints "
                                                       "(0 = at each epoch's end); the last step always")
    visualize_every: int = Field(0, ge=0, le=MAX_EPOCHS, description="epochs between reconstruction figures (0 = never)")
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)

    @model_validator(mode="after")
    def _fsdp_alone_on_the_model(self) -> "TrainSettings":
        if self.fsdp and self.visualize_every:
            raise ValueError("train.fsdp with train.visualize_every: a sharded model cannot draw figures "
                             "on the main process alone; set train.visualize_every=0 and run "
                             "`localmim visualize` on a checkpoint instead")
        return self


class PretrainSettings(Strict):
    """Everything `localmim pretrain` reads."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)


# ---------------------------------------------------------------------------------------------
# Fine-tuning (`localmim finetune`) and evaluation (`localmim evaluate`)


class FinetuneModelSettings(Strict):
    arch: str | None = Field(None, description="timm architecture the --init checkpoint must match, e.g. "
                                               "vit_base_patch16_224; empty = whatever the checkpoint is")
    img_size: int | None = Field(None, ge=8, le=MAX_IMG_SIZE, description="input side in pixels; empty = the checkpoint's "
                                                          "(position embeddings are resampled when it differs)")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate at the last block")
    head_init_std: float = Field(2e-5, gt=0, description="trunc-normal std of the new classifier head")
    head_init: Literal["trunc_normal", "linear_probe"] = Field(
        "trunc_normal", description="how a fresh run's fc_norm and head start: trunc_normal(head_init_std), "
        "or linear_probe (LP-FT): a linear probe fitted on the --init encoder's pooled, normed features of "
        "the training images, so fine-tuning starts from the probe's accuracy (one process only)")


class FinetuneDataSettings(Strict):
    path: Path | None = Field(None, description="training folder, one subfolder per class (ImageFolder)")
    val_path: Path | None = Field(None, description="separate validation folder with the same class folders")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of each class held out for validation "
                                                             "when no val_path is given (0 = none)")
    workers: int = Field(2, ge=0, le=MAX_WORKERS, description="loader processes per device")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="passes over the training images per epoch (small folders)")
    crop_scale: CropScale = Field((0.08, 1.0), description="RandomResizedCrop area range")
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    auto_augment: str | None = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment policy; "
                                                                        "empty = none")
    color_jitter: float | None = Field(None, ge=0, description="colour jitter strength (timm: unused "
                                                               "when auto_augment is set)")
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    reprob: float = Field(0.25, ge=0, le=1, description="random erasing probability")
    remode: Literal["pixel", "rand", "const"] = Field("pixel", description="random erasing fill")
    recount: int = Field(1, ge=1, le=MAX_REPEATS, description="random erasing boxes per image")
    eval_crop_fraction: float = Field(0.875, gt=0, le=1, description="eval: resize the short side to "
                                      "img_size / this, then centre crop (224/256 as published)")


class MixupSettings(Strict):
    mixup: float = Field(0.8, ge=0, description="Mixup alpha (0 = off)")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha (0 = off)")
    cutmix_minmax: tuple[float, float] | None = Field(None, description="CutMix box ratio range; "
                                                                        "overrides the alpha when set")
    prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    switch_prob: float = Field(0.5, ge=0, le=1, description="probability of CutMix when both are on")
    mode: Literal["batch", "pair", "elem"] = "batch"

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None)


class FinetuneOptimSettings(Strict):
    base_lr: float = Field(5e-4, gt=0, le=MAX_LR, description="lr per 256 images; "
                           "lr = base_lr * effective batch / 256")
    lr: float | None = Field(None, gt=0, le=MAX_LR, description="absolute lr; overrides base_lr scaling when set")
    min_lr: float = Field(1e-6, ge=0, description="floor of the cosine schedule")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay; 1-D params, pos_embed and "
                                                        "cls_token excluded")
    betas: tuple[float, float] = Field((0.9, 0.999))
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise lr decay: block i gets "
                                                             "layer_decay^(L+1-i) of the lr")
    warmup_epochs: float = Field(5, ge=0, description="linear warmup, per step")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm; empty = no clipping")
    label_smoothing: float = Field(0.1, ge=0, lt=1)

    _floor_below_peak = model_validator(mode="after")(_min_lr_below_lr)


class FinetuneTrainSettings(TrainingRunSettings):
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="images per device per micro-step")
    seed: int = Field(0, **SEED_RANGE, description="run seed: split, augmentations, mixing and drop path derive from it")
    log_every: int = Field(20, ge=1, le=MAX_STEPS, description="optimizer steps between logged metrics")
    eval_every: int = Field(1, ge=0, le=MAX_EPOCHS, description="epochs between validation passes (0 = last epoch only)")
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH, description="validation batch; empty = batch_size")
    checkpoint_every: int = Field(0, ge=0, le=MAX_STEPS, description="optimizer steps between checkpoints "
                                                       "(0 = at each epoch's end); the last step always")
    head_warmup_epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="linear probe, then fine-tune (LP-FT): for the first N epochs "
        "only fc_norm and the head train, on the frozen encoder's features; then everything does "
        "(one process only; 0 = fine-tune everything from the start)")
    init_probes: Literal["auto", "on", "off"] = Field(
        "auto", description="score the --init encoder's k-NN and linear probe on the run's own split, so "
        "the summary shows whether fine-tuning paid; auto = on up to 50,000 training images (one "
        "feature pass over the data, cached beside the encoder's run)")


class FinetuneSettings(Strict):
    """Everything `localmim finetune --task classification` (the default task) reads."""

    task: Literal["classification"] = Field("classification", description="the fine-tuning task "
                                            "(--task; see config/tasks.py): set when the run starts")
    init: Path | None = Field(None, description="checkpoint to start from: a pretrain run, a checkpoint, "
                                                "a published .pth/.safetensors, or an exported encoder")
    model: FinetuneModelSettings = Field(default_factory=FinetuneModelSettings)
    data: FinetuneDataSettings = Field(default_factory=FinetuneDataSettings)
    mixup: MixupSettings = Field(default_factory=MixupSettings)
    optim: FinetuneOptimSettings = Field(default_factory=FinetuneOptimSettings)
    train: FinetuneTrainSettings = Field(default_factory=FinetuneTrainSettings)

    @model_validator(mode="after")
    def _even_batch_for_mixing(self) -> "FinetuneSettings":
        if self.mixup.active and self.mixup.mode == "batch" and self.train.batch_size % 2:
            raise ValueError(f"train.batch_size {self.train.batch_size} is odd; Mixup/CutMix in batch mode "
                             "pairs images, so use an even batch or turn mixing off (mixup.prob=0)")
        return self

    @model_validator(mode="after")
    def _encoder_trains_at_last(self) -> "FinetuneSettings":
        if self.train.head_warmup_epochs >= self.train.epochs:
            raise ValueError(f"train.head_warmup_epochs {self.train.head_warmup_epochs} leaves no epoch of "
                             f"train.epochs {self.train.epochs} to fine-tune the encoder in; lower it, or use "
                             "`localmim evaluate --protocol linear` for a linear probe alone")
        return self


class LinearProbeSettings(Strict):
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS, description="passes over the training features per fit")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    lrs: list[float] = Field([1e-3, 3e-3, 1e-2, 3e-2, 1e-1], min_length=1,
                             description="learning rates swept (AdamW, cosine)")
    weight_decays: list[float] = Field([0.0, 1e-4, 1e-3, 1e-2], min_length=1,
                                       description="weight decays swept")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of the training features held "
                                                                 "out to pick lr and weight decay")


class SegLinearSettings(Strict):
    img_size: int = Field(224, ge=16, le=MAX_IMG_SIZE, description="side the images are resized to (square) "
                          "for the frozen features; --img-size overrides")
    steps: int = Field(300, ge=1, le=MAX_EPOCHS * 100, description="full-batch AdamW steps of the 1x1 head")
    lr: float = Field(0.01, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0)


class FewshotSettings(Strict):
    way: int | None = Field(5, ge=2, le=MAX_BATCH, description="classes per episode; empty = all classes")
    shots: list[int] = Field([1, 5], min_length=1, description="labelled examples per class (one "
                                                               "result per value)")
    queries: int | None = Field(15, ge=1, le=MAX_BATCH, description="query images per class per episode, from the "
                                                      "validation side; empty = all")
    episodes: int = Field(100, ge=1, le=MAX_STEPS, description="random episodes; the result is their mean and 95% interval")
    classifier: Literal["centroid", "logistic"] = Field("centroid", description="nearest class mean "
                                                        "(cosine), or logistic regression on the support")


class EvaluateDataSettings(Strict):
    val_path: Path | None = Field(None, description="separate validation folder; else DATA is split")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of each class of DATA held out as "
                                                             "validation for the probes")
    workers: int = Field(2, ge=0, le=MAX_WORKERS, description="loader processes")
    eval_crop_fraction: float = Field(0.875, gt=0, le=1, description="resize the short side to img_size / "
                                                                     "this, then centre crop")


class EvaluateModelSettings(Strict):
    img_size: int | None = Field(None, ge=8, le=MAX_IMG_SIZE, description="input side; empty = the checkpoint's")


class EvaluateTrainSettings(Strict):
    """How the evaluation computes; `train` as in the other commands, so one name means one thing."""

    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="images per forward")
    device: Device = Field("auto", description="auto, cpu, mps, cuda, cuda:N")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = Field(0, **SEED_RANGE, description="seed of the split, the linear probe's sweep and the episodes")


class EvaluateSettings(Strict):
    """Everything `localmim evaluate` reads."""

    # The flat names of earlier versions, refused with the new name (config/layers.py).
    RENAMED: ClassVar[dict[str, str]] = {
        "val_path": "data.val_path", "val_fraction": "data.val_fraction", "workers": "data.workers",
        "crop_fraction": "data.eval_crop_fraction", "img_size": "model.img_size",
        "batch_size": "train.batch_size", "device": "train.device", "precision": "train.precision",
        "seed": "train.seed"}

    protocol: Literal["auto", "classifier", "knn", "linear", "fewshot", "seg-linear"] = Field(
        "auto", description="auto = a fine-tuned model's own task (classifier, segmentation, detection), "
                            "knn for an encoder")
    mode: Literal["auto", "slide", "whole"] = Field("auto", description="segmentation: test inference, "
                                                    "slide windows or the whole image; auto = the run's val.mode")
    stride: int | None = Field(None, ge=1, le=MAX_IMG_SIZE, description="segmentation, slide: window stride "
                               "in pixels; empty = the run's val.stride")
    data: EvaluateDataSettings = Field(default_factory=EvaluateDataSettings)
    model: EvaluateModelSettings = Field(default_factory=EvaluateModelSettings)
    train: EvaluateTrainSettings = Field(default_factory=EvaluateTrainSettings)
    cache: bool = Field(True, description="reuse features cached by an earlier run with the same "
                                          "checkpoint, images and preprocessing")
    knn: KnnSettings = Field(default_factory=KnnSettings)
    linear: LinearProbeSettings = Field(default_factory=LinearProbeSettings)
    fewshot: FewshotSettings = Field(default_factory=FewshotSettings)
    seg_linear: SegLinearSettings = Field(default_factory=SegLinearSettings)
