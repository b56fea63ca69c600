"""Skip marks shared by several test modules."""

import pytest

from megatrain.parallel.pipeline_layout import SPLIT_BACKWARD_MIN_TORCH, split_backward_supported

# zbv / dualpipev cases: torch 2.11 (the lent GPU machines' version) cannot run them, and the
# trainer refuses them there with a ConfigError (tests/test_parallel_topology.py checks that)
needs_split_backward = pytest.mark.skipif(
    not split_backward_supported(),
    reason=f"zero-bubble schedules need torch >= {'.'.join(map(str, SPLIT_BACKWARD_MIN_TORCH))}")
