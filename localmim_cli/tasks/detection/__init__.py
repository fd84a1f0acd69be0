"""Fine-tuning for object detection and instance segmentation: ViTDet's protocol on torchvision's
Mask R-CNN, COCO-format data in and COCO AP out.

    data.py       the COCO, splits and split layouts, checked before training; the datasets
    augment.py    large-scale jitter (flip, resize 0.1-2.0 of the crop, crop), seeded per sample
    model.py      pyramid (model/feature_pyramid.py) + neck + torchvision's Mask R-CNN / Faster R-CNN
    metric.py     COCO box and mask AP with pycocotools' COCOeval
    recipe.py     the training task on the engine (step schedule, layer-wise lr decay, best by box AP)
    export.py     the encoder for detectron2's and mmdetection's ViTDet / Swin backbones
"""
