"""Fine-tuning for classification: the published ViT protocol (MAE's).

    data.py     labelled folders through RandAugment + random erasing, Mixup/CutMix, the loss
    model.py    the encoder as a timm classifier: global average pool, a new fc_norm and head
    metric.py   validation top-1 / top-5
    recipe.py   the training task on the engine (layer-wise lr decay, best checkpoint by top-1)
"""
