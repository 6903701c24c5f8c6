"""lrbs: the learning rate and the batch size, measured."""

__version__ = "0.1.0"
