"""sazs.quality: do the priors segment real objects? Stores scored against human masks (``sazs-eval priors``).

``quality`` (the metrics of one image), ``scoring`` (a store against a dataset's masks),
``baseline`` (the original formulation's stores on the same features), ``report`` (tables and
pictures), ``cli`` (the ``sazs-eval priors`` command).
"""
