"""benchmarks/gpu_checkpoint_varlen.py on the CPU: the checkpointed backward under varlen attention."""

from __future__ import annotations

import pytest

probe = pytest.importorskip("benchmarks.gpu_checkpoint_varlen")


def test_keeping_the_varlen_attention_for_the_backward_gives_the_unchecked_gradients():
    out = probe.check("cpu")
    assert out["kept_max_grad_diff"] < 1e-6
    # As the recipes run it today (implementation switched around the forward only), the
    # recomputation runs other attention: checkpointing fails. When decoder_hidden keeps the
    # implementation for the backward, this reads "ok" and RESULTS.md's run 17 note is out of date.
    assert out["checkpointed"] == "ok" or out["checkpointed"].startswith("CheckpointError")
