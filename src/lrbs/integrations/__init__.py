"""Plug lrbs into the trainers people already use: HuggingFace ``transformers.Trainer`` and Lightning.

- :mod:`lrbs.integrations.transformers` — ``LrbsCallback`` (a ``TrainerCallback``), ``attach`` and ``find_lr``;
  needs ``pip install 'lrbs[transformers]'``.
- :mod:`lrbs.integrations.lightning` — ``LrbsCallback`` (a ``lightning.pytorch.Callback``) and ``find_lr``; needs
  ``pip install 'lrbs[lightning]'``.
- :mod:`lrbs.integrations.measure` — everything below the framework glue (the micro-batch noise-scale estimator,
  the probe, the sharpness measurement, the edge-of-stability thresholds), framework-free, and
  :mod:`lrbs.integrations.monitor`, the cadence and bookkeeping both callbacks share.

Importing this package imports neither framework; each submodule imports its own when it is imported.
"""

__all__ = ["measure", "monitor", "transformers", "lightning"]
