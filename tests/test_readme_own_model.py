"""The README's "Your own model" examples run as written: each ```python block of that section is extracted from
README.md by its heading and executed."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Your own model"


def _blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{HEADING}\n")
    end = text.find("\n## ", start + len(HEADING) + 2)
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_two_examples():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "GPT2LMHeadModel" in blocks[0] and "def forward(self, x, meta)" in blocks[1]


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:{HEADING}", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def test_huggingface_example_runs():
    pytest.importorskip("transformers")
    ns = _run(_blocks()[0])
    assert math.isfinite(ns["top"]) and ns["top"] > 0
    assert math.isfinite(ns["b_simple"])
    assert ns["result"].status == "completed" and len(ns["result"].history["loss"]) == 10
    assert len(ns["rt"].lrs) >= 2


def test_two_input_example_runs():
    ns = _run(_blocks()[1])
    assert ns["result"].status == "completed"
    assert ns["lr"] > 0 and isinstance(ns["why"], str)
    assert 0.0 <= ns["obj"].metrics()["accuracy"] <= 1.0
