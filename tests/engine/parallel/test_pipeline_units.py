"""The pipeline's pieces without a group: what a block costs the pipeline (the runtime's
admission adds it up), the control plane's wire format, the mailbox."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.errors import EngineError
from engine.parallel import messages as msg
from engine.parallel.engine import PipelineBlock
from engine.parallel.worker import Mailbox


def test_a_block_costs_the_pipeline_its_busiest_stage() -> None:
    p = PipelineBlock("s", 7, 84, 0, expected=2, timeout_s=5.0)
    frames = np.zeros((12, 8, 8, 3), np.uint8)
    p.stages[0] = msg.StageDone("s", 7, 0, busy=0.30, steps=(0.25,), features=0.05)
    p.frames = msg.Frames("s", 7, frames, decode=0.2, postprocess=0.01, rank=2, critical=True)
    p.features, p.features_rank = 0.04, 2  # computed on the VAE rank (rank 2)
    assert not p.complete()  # rank 1's report is still missing
    p.stages[1] = msg.StageDone("s", 7, 1, busy=0.26, steps=(0.26,))
    assert p.complete() and p.done()
    t = p.result().timings
    assert t.steps == (0.25, 0.26) and t.denoise == pytest.approx(0.51)
    assert t.features == pytest.approx(0.09)  # wav2vec2 on rank 2 + the tokens on rank 0
    assert t.busy == pytest.approx(0.30)  # rank 0; rank 2: 0.2 + 0.01 + 0.04
    assert p.result().first_frame == 84 and t.total >= 0


def test_late_reports_do_not_hold_a_block_and_a_lost_one_times_out() -> None:
    p = PipelineBlock("s", 0, 0, 0, expected=4, timeout_s=0.2)
    p.frames = msg.Frames("s", 0, np.zeros((12, 8, 8, 3), np.uint8), 0.1, 0.0, 4, True)
    assert p.complete(force=True) and p.result().timings.busy == pytest.approx(0.1)
    lost = PipelineBlock("s", 1, 12, 0, expected=1, timeout_s=0.2)
    with pytest.raises(EngineError, match="did not come back within"):
        lost.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_tensors_cross_the_control_plane_exactly(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    w = msg.Wire.of(t)
    assert isinstance(w.data, np.ndarray)  # plain numpy: pickles across hosts
    back = w.tensor()
    assert back.dtype == dtype and torch.equal(back, t)


def test_the_mailbox_waits_with_a_timeout_and_drops_closed_sessions() -> None:
    box = Mailbox()
    box.put(("refresh", "a", 0), "early")  # no open session "a": dropped
    box.open("a")
    threading.Timer(0.05, box.put, (("refresh", "a", 4), "latent")).start()
    assert box.take(("refresh", "a", 4), timeout=5.0) == "latent"
    with pytest.raises(TimeoutError, match="nothing arrived for"):
        box.take(("refresh", "a", 0), timeout=0.05)
    box.put(("features", "a", 9), 1)
    box.close("a")
    box.put(("features", "a", 10), 2)  # after the close: dropped
    assert not box._items
