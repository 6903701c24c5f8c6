"""Store.run: the one run lifecycle (start on enter; finish inside; an exception or a block that ends without
finish marks the run failed)."""

import pytest

from lrbs.errors import StoreError
from lrbs.store import Store


def test_run_block_finishes_fails_and_reraises(tmp_path):
    with Store(tmp_path / "s.sqlite") as st:
        with st.run({"a": 1}, "fit") as run:
            run.log([(0, "loss", 2.0)])
            run.finish("completed", result={"x": 1.5}, metrics=[(1, "loss", 1.0)])
        rec = st.get(run.key)
        assert (rec.status, rec.result) == ("completed", {"x": 1.5})
        assert st.metrics(run.key) == [(0, "loss", 2.0), (1, "loss", 1.0)]

        with pytest.raises(ValueError, match="boom"), st.run({"a": 2}, "fit") as run:
            raise ValueError("boom")
        rec = st.get(run.key)
        assert (rec.status, rec.error) == ("failed", "ValueError: boom")

        with st.run({"a": 3}, "fit") as run:
            pass
        assert st.get(run.key).status == "failed"
        assert "without finish()" in st.get(run.key).error

        with st.run({"a": 1}, "fit") as again:  # finished before the block: left as it is
            pass
        assert again.key == st.find({"a": 1}).key and st.get(again.key).status == "completed"


def test_run_handle_started_later_and_unstarted(tmp_path):
    with Store(tmp_path / "s.sqlite") as st:
        run = st.run({"b": 1}, "sweep")
        with pytest.raises(StoreError, match="not started"):
            run.finish("completed")
        run.start()
        assert run.running
        run.fail("worker died")
        assert (st.get(run.key).status, st.get(run.key).error) == ("failed", "worker died")
