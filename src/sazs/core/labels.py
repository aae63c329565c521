"""Label conventions shared by the datasets, the trainer and the metrics (no torch here)."""

IGNORE_INDEX = 255  # a pixel with this label counts nowhere: VOC's "void", unlabelled, or held out
