import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU through Triton's interpreter; this must be set
# before any module decorated with @triton.jit is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds path parts too
            item.add_marker(skip)
