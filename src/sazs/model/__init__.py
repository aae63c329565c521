"""sazs.model: the zero-shot segmentation model, shared by the trainer and the evaluator.

``model`` (backbone + dense head + text classifier, input normalisation), ``encoders`` (open_clip,
pipeline ViTs, sentence encoders), ``text`` (class-name embeddings), ``checkpoint`` (tensors and
plain values only, never code), ``cache`` (frozen-backbone feature cache).
"""
