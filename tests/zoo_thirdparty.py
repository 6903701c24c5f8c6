"""Tiny third-party-style models and data sources for tests: built from configs, no download, fast on one core.

Importable by every test module (read-only for other helpers): a HuggingFace GPT-2 language model with dict batches
``{"input_ids", "labels"}``, a HuggingFace BERT sequence classifier with dict batches ``{"input_ids",
"attention_mask", "labels"}``, a two-input model ``forward(x, meta)`` with batches ``(x, meta, y)``, a model whose
forward returns a dict of scalar losses, and the data sources users hold: a ``TensorDataset``, an
``IterableDataset`` and a map-style dataset with a random-flip transform.

The HF configs are small enough for a dense Hessian (about 1,100 parameters each).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 16
SEQ = 8
NUM_LABELS = 3
FEATURES = 6
META = 3
CLASSES = 3


def _transformers():
    import pytest

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------------------------------- HuggingFace
def tiny_gpt2(seed: int = 0, **config: Any) -> nn.Module:
    """``GPT2LMHeadModel`` with ``n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8``, no dropout
    (1,080 parameters); ``config`` overrides any of them."""
    tf = _transformers()
    kw = dict(
        n_embd=8, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(config)
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(**kw)).eval()


def tiny_bert(seed: int = 0, **config: Any) -> nn.Module:
    """``BertForSequenceClassification`` with ``hidden_size=8``, one layer of two heads, ``vocab_size=16``,
    three labels, no dropout; ``config`` overrides any of them."""
    tf = _transformers()
    kw = dict(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    kw.update(config)
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(tf.BertConfig(**kw)).eval()


def lm_batches(n: int = 12, batch: int = 4, seq: int = SEQ, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Dict batches ``{"input_ids", "labels"}`` (labels = the ids; the model shifts them) for :func:`tiny_gpt2`."""
    ids = torch.randint(1, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [
        {"input_ids": ids[i : i + batch], "labels": ids[i : i + batch].clone()} for i in range(0, n, batch)
    ]


def cls_batches(n: int = 12, batch: int = 4, seq: int = SEQ, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Dict batches ``{"input_ids", "attention_mask", "labels"}`` for :func:`tiny_bert`: each sequence has a random
    length in ``[3, seq]``, padded with id 0 and masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    return [
        {
            "input_ids": ids[i : i + batch],
            "attention_mask": mask[i : i + batch],
            "labels": labels[i : i + batch],
        }
        for i in range(0, n, batch)
    ]


def lm_loss(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM in the logits' own dtype (HF's ``output.loss`` upcasts to float32;
    this keeps float64 for dense-Hessian references): ``logits[:, :-1]`` against ``labels[:, 1:]``."""
    logits = output.logits[:, :-1]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )


def cls_loss(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of a sequence classifier's logits against ``batch["labels"]``, in the logits' dtype."""
    return nn.functional.cross_entropy(output.logits, batch["labels"])


class DictDataset(torch.utils.data.Dataset):
    """A map-style dataset of dict samples (what a tokenized HF dataset yields); ``default_collate`` stacks them."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.samples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.samples[i]


# ----------------------------------------------------------------------------------------------- plain PyTorch
class TwoInput(nn.Module):
    """``forward(x, meta)``: logits of ``Linear(tanh(Linear(x)) + Linear(meta))``; batches ``(x, meta, y)``."""

    def __init__(self, hidden: int = 5):
        super().__init__()
        self.fx = nn.Linear(FEATURES, hidden)
        self.fm = nn.Linear(META, hidden, bias=False)
        self.out = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fx(x) + self.fm(meta)))


def two_input(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TwoInput()


def two_input_data(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, meta, y)`` tensors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    meta = torch.randn(n, META, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, meta, y


class DictLoss(nn.Module):
    """``forward(x, y)`` returns a dict of scalar losses (torchvision's detection convention): cross-entropy and an
    L2 penalty on the hidden activations."""

    def __init__(self, hidden: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {
            "loss_ce": nn.functional.cross_entropy(self.head(h), y),
            "loss_act": 0.1 * h.pow(2).mean(),
        }


def dict_loss(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DictLoss()


def dict_loss_data(n: int = 40, seed: int = 1) -> dict[str, torch.Tensor]:
    """``{"x", "y"}``: equally long tensors (a batch is ``model(**batch)``)."""
    x, _, y = two_input_data(n, seed)
    return {"x": x, "y": y}


def mlp(seed: int = 0, hidden: int = 5) -> nn.Module:
    """A small classifier on ``FEATURES`` inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES))


def tensor_dataset(n: int = 40, seed: int = 1) -> torch.utils.data.TensorDataset:
    x, _, y = two_input_data(n, seed)
    return torch.utils.data.TensorDataset(x, y)


class Stream(torch.utils.data.IterableDataset):
    """An ``IterableDataset`` yielding ``(x, y)`` samples one at a time, in order (no ``__len__``)."""

    def __init__(self, n: int = 40, seed: int = 1):
        self.x, _, self.y = two_input_data(n, seed)

    def __iter__(self):
        for i in range(len(self.y)):
            yield self.x[i], self.y[i]


class Flipped(torch.utils.data.Dataset):
    """A map-style dataset with a random transform: each ``x`` is reversed with probability 1/2 (torch's RNG)."""

    def __init__(self, n: int = 40, seed: int = 1):
        self.x, _, self.y = two_input_data(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(0)
        return x, self.y[i]
