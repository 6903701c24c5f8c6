"""``python -m lrbs`` (also under torchrun)."""

from lrbs.cli import entry

if __name__ == "__main__":
    entry()
