"""Fine-tuning for semantic segmentation: the published ADE20K protocol (UperNet).

    data.py       the ADE20K and pairs layouts, checked before training; the datasets
    augment.py    the published training pipeline (resize, crop, flip, photometric), seeded per sample
    model.py      pyramid (model/feature_pyramid.py) + UperNet decode head + FCN auxiliary head; the loss
    inference.py  slide and whole inference (what validation and evaluation run)
    metric.py     mIoU / mAcc / aAcc / per-class from a confusion matrix
    recipe.py     the training task on the engine (poly schedule, layer-wise lr decay, best by mIoU)
"""
