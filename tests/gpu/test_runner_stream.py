"""The runner's light stream context (_OnStream) does what torch.cuda.stream does: work inside it
is queued on the runner's stream, and the stream before is current again after, nested too."""

from __future__ import annotations

import pytest
import torch

from aio_engine.model_runner import _OnStream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a CUDA GPU")


def test_on_stream_sets_and_restores_the_current_stream():
    outer, inner = torch.cuda.Stream(), torch.cuda.Stream()
    before = torch.cuda.current_stream()
    with _OnStream(outer):
        assert torch.cuda.current_stream() == outer
        with _OnStream(inner):
            assert torch.cuda.current_stream() == inner
            x = torch.ones(1 << 20, device="cuda")
            event = torch.cuda.Event()
            event.record()
        assert torch.cuda.current_stream() == outer
    assert torch.cuda.current_stream() == before
    event.synchronize()
    assert inner.query() and float(x.sum()) == float(1 << 20)
    with pytest.raises(RuntimeError), _OnStream(outer):
        raise RuntimeError("out through the context")
    assert torch.cuda.current_stream() == before
