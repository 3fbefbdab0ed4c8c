"""torchcodec on NVDEC (data.decode_device=cuda): the same frames as on the CPU. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

from neighborretr.data.video_io import read_frames
from tests.conftest import AVAILABLE_BACKENDS
from tests.unit.test_video_io import write_noisy_video

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif("torchcodec" not in AVAILABLE_BACKENDS, reason="torchcodec does not load here"),
]


def test_nvdec_gives_the_cpu_frames(tmp_path):
    path = write_noisy_video(tmp_path / "v.mp4", "libx264", {"bf": "2", "g": "12"})
    rng = [np.random.default_rng(3), np.random.default_rng(3)]
    gpu, gpu_idx = read_frames(path, 12, "random", rng[0], backend="torchcodec", framerate=10, device="cuda")
    cpu, cpu_idx = read_frames(path, 12, "random", rng[1], backend="torchcodec", framerate=10)
    np.testing.assert_array_equal(gpu_idx, cpu_idx)
    diff = np.abs(gpu.astype(int) - cpu.astype(int))
    # NVDEC converts YUV to RGB with its own kernels: the same frames, colours within a few levels
    assert diff.mean() < 1.5 and diff.max() <= 8, (diff.mean(), diff.max())
