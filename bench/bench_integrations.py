"""Overhead of the free noise-scale estimate: a HF Trainer step with ``LrbsCallback`` against the same step without.

Tiny GPT-2 (``n_embd=32, n_layer=2, n_head=2``, vocab 64, sequences of 32 tokens), ``per_device_train_batch_size=8``,
``gradient_accumulation_steps=4``, CPU. Each repetition builds two identical Trainers and times the median optimizer step of ``trainer.train()``
(``steps`` steps, process time) without and with the callback (``noise_scale=True``,
sharpness off), in alternating order; the overhead is the median of the paired ratios, with the best-of-N times
next to it (the machine is shared and noisy). A second row times the capture hooks alone on one micro-batch's
forward + backward, and a third the time spent inside lrbs's own hooks and callback methods during a run.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from bench.common import peak_gflops, row


def _data(n: int = 256, seq: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    ids[:, 1::2] = (3 * ids[:, ::2] + 1) % 64
    return [{"input_ids": x, "labels": x} for x in ids]


def _trainer(tmp: str, steps: int, callback):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    args = transformers.TrainingArguments(
        output_dir=tmp,
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    tr = transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=_data())
    if callback is not None:
        from lrbs.integrations.transformers import attach

        attach(tr, callback)
    return tr


def _step_times(tmp: str, steps: int, with_callback: bool) -> float:
    """Median CPU seconds of one optimizer step (``on_step_begin`` to ``on_step_end``, all micro-batches, the
    optimizer step and every callback's step hooks) over a ``trainer.train()`` run. Process time and a median over
    the steps: far less exposed than a whole run's wall time to the other processes of a shared machine."""
    import transformers

    from lrbs.integrations.transformers import LrbsCallback

    marks: list[tuple[str, float]] = []

    class Mark(transformers.TrainerCallback):
        def __init__(self, event: str):
            self.event = event

        def on_step_begin(self, args, state, control, **kwargs):
            if self.event == "begin":
                marks.append(("begin", time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            if self.event == "end":
                marks.append(("end", time.process_time()))

    tr = _trainer(tmp, steps, LrbsCallback() if with_callback else None)
    tr.callback_handler.callbacks.insert(0, Mark("begin"))  # before every other callback's on_step_begin
    tr.add_callback(Mark("end"))  # after every other callback's on_step_end
    tr.train()
    begins = [t for e, t in marks if e == "begin"]
    ends = [t for e, t in marks if e == "end"]
    return statistics.median(b - a for a, b in zip(begins, ends))


def _toggled(tmp: str, steps: int) -> list[float]:
    """Within one run, the capture hooks on for even steps and off for odd ones: the ratio of each on-step's CPU
    time to the mean of its two off-neighbours' (adjacent steps see the same machine load). The forward pre-hook
    and ``on_log`` stay on throughout; their cost is in the self-time row."""
    import warnings

    import transformers

    from lrbs.integrations.transformers import LrbsCallback

    cb = LrbsCallback()
    marks: list[tuple[bool, float, float]] = []
    begin: list[float] = []

    class Toggle(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            cap = cb.capture
            cap.attach() if state.global_step % 2 == 0 else cap.detach()
            begin.append(time.process_time())

    class End(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(((state.global_step - 1) % 2 == 0, begin[-1], time.process_time()))

    tr = _trainer(tmp, steps, cb)
    tr.callback_handler.callbacks.insert(0, Toggle())
    tr.add_callback(End())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # off-steps have no contributions: the callback says so once
        tr.train()
    t = [b - a for _, a, b in marks]
    return [t[i] / ((t[i - 1] + t[i + 1]) / 2) for i in range(1, len(t) - 1) if marks[i][0]]


def _hooks_only(repeats: int) -> tuple[float, float]:
    """Seconds of one micro-batch forward + backward of the same model without / with the capture hooks
    (best of ``repeats`` blocks of 20, interleaved)."""
    from lrbs.integrations.measure import GradCapture

    model = _trainer(tempfile.gettempdir(), 1, None).model.train()
    batch = {k: torch.stack([d[k] for d in _data()[:8]]) for k in ("input_ids", "labels")}
    cap = GradCapture(model.parameters(), total_when=lambda: True)

    def block() -> float:
        t0 = time.process_time()
        for _ in range(20):
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
            cap.reset()
        return (time.process_time() - t0) / 20

    off, on = [], []
    for _ in range(repeats):
        off.append(block())
        cap.attach()
        on.append(block())
        cap.detach()
    return min(off), min(on)


def _self_time(tmp: str, steps: int) -> tuple[float, float]:
    """``(seconds inside lrbs's hooks and callback methods, seconds of trainer.train())`` for one run with the
    callback: the direct cost, read with timers around lrbs's own functions (less exposed to the machine's load
    than a difference of two noisy runs; it leaves out cache effects on the rest of the step)."""
    import functools

    from lrbs.integrations import measure
    from lrbs.integrations.transformers import LrbsCallback

    spent = [0.0]
    saved = []

    def timed(owner, name):
        fn = getattr(owner, name)
        saved.append((owner, name, fn))

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    for name in ("_on_grad", "_on_backward_end", "_read_total"):
        timed(measure.GradCapture, name)
    # on_log solves the steps held since the last log (on_train_end those after it)
    for name in ("on_step_begin", "on_step_end", "on_log", "_record", "on_train_end"):
        timed(LrbsCallback, name)
    try:
        tr = _trainer(tmp, steps, LrbsCallback())
        t0 = time.perf_counter()
        tr.train()
        total = time.perf_counter() - t0
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    return spent[0], total


def main(quick: bool = False) -> list[dict]:
    steps, repeats = (20, 3) if quick else (40, 7)
    plain, cb = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _step_times(tmp, 5, True)  # warm up both paths (imports, first-call costs)
        _step_times(tmp, 5, False)
        for r in range(repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            for w in order:
                (cb if w else plain).append(_step_times(tmp, steps, w))
    ratios = [c / p for c, p in zip(cb, plain)]
    med = statistics.median(ratios)
    note = (
        f"{repeats} interleaved pairs x {steps} steps, median step (process time); overhead median of paired "
        f"ratios {100 * (med - 1):+.1f}% (range {100 * (min(ratios) - 1):+.1f}% .. {100 * (max(ratios) - 1):+.1f}%)"
        f"; best-of-{repeats} {100 * (min(cb) / min(plain) - 1):+.1f}%; peak fp32 {peak_gflops():.1f} GFLOP/s"
    )
    off, on = _hooks_only(repeats)
    with tempfile.TemporaryDirectory() as tmp:
        toggled = [r for _ in range(3) for r in _toggled(tmp, 2 * steps)]
    tog = statistics.median(toggled)
    with tempfile.TemporaryDirectory() as tmp:
        selfs = [_self_time(tmp, steps) for _ in range(3)]
    share = statistics.median(a / b for a, b in selfs)
    return [
        row(
            "integrations",
            "same run, capture hooks on (even steps) vs off (odd): on-step / mean of its off-neighbours",
            tog,
            note=f"median of {len(toggled)} on-steps over 3 runs x {2 * steps} steps: {100 * (tog - 1):+.1f}%",
        ),
        row(
            "integrations",
            "HF Trainer step, GPT-2 tiny, accum 4: LrbsCallback vs none",
            statistics.median(cb),
            peer="Trainer without callback",
            peer_s=statistics.median(plain),
            note=note,
        ),
        row(
            "integrations",
            "one micro-batch forward+backward: capture hooks on vs off",
            on,
            peer="no hooks",
            peer_s=off,
            note=f"best of {repeats} x 20 (process time)",
        ),
        row(
            "integrations",
            "time inside lrbs hooks + callback methods, share of trainer.train()",
            statistics.median(a for a, _ in selfs) / steps,
            peer="whole step",
            peer_s=statistics.median(b for _, b in selfs) / steps,
            note=f"median of 3 runs x {steps} steps: {100 * share:.2f}% of the step",
        ),
    ]


if __name__ == "__main__":
    for r in main():
        print(r)
