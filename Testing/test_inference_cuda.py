"""CUDA checks: they run wherever a CUDA GPU is present and skip elsewhere (CI has none; `-m cuda` picks them).

The GPU path differs from the CPU one in three ways a user can see: float16 mixed precision, the memory it can
run out of, and where the tensors live. Each is checked against the CPU float32 result of the same network."""

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


def _model_space(card):
    from AbdomenSegLib.io.phantom import make_phantom
    from AbdomenSegLib.preprocessing.pipeline import to_model_space

    image, _ = make_phantom(size=(128, 112, 72))
    space = to_model_space(image, card["spacing"], card["intensity"], orientation=card.get("orientation", "LPS"))
    return space.array


def test_cuda_mixed_precision_matches_cpu_float32(tiny_package):
    """float16 autocast on the GPU against float32 on the CPU: the same label wherever the CPU's winner leads by
    more than 0.05, probabilities equal to 2e-3 on average. The largest single difference is loose (0.1): in this untrained network's windows, instance
    norm over nearly constant feature maps magnifies float16 rounding (0.040 on an H200, 2026-11-26)."""
    from AbdomenSegLib.inference.inferer import inferer_for
    from AbdomenSegLib.models.packages import load_network

    network = load_network(tiny_package).eval()
    array = _model_space(tiny_package)
    inferer = inferer_for(tiny_package)
    cpu = inferer(network, array, "cpu", "fp32")
    gpu = inferer(network.to("cuda"), array, "cuda", "fp32")
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    difference = np.abs(gpu - cpu)
    print(f"probability difference: mean {difference.mean():.2e}, max {difference.max():.3f}")
    top2 = np.sort(cpu, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 0.05  # an untrained network ties nearly everywhere: judge clear decisions
    agree = float((gpu.argmax(0) == cpu.argmax(0))[decided].mean())
    print(f"labels agree on {agree:.4f} of the {decided.mean():.3f} of voxels with a margin > 0.05")
    assert decided.mean() > 0.01 and agree >= 0.999
    assert float(difference.mean()) < 2e-3 and float(difference.max()) < 0.1


def test_cuda_output_is_in_the_input_grid(tiny_package):
    """An oblique, off-centre scan segmented on the GPU: the input's exact grid, and the CPU's labels."""
    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.io.phantom import make_phantom, rotation

    image, _ = make_phantom(size=(100, 90, 60), direction=rotation("z", 17.0), origin=(-31.5, 12.25, 40.0))
    gpu = Segmenter(tiny_package, "cuda", log=lambda m: None).segment(image)
    cpu = Segmenter(tiny_package, "cpu", log=lambda m: None).segment(image)
    for out in (gpu, cpu):
        assert out.GetSize() == image.GetSize()
        assert out.GetOrigin() == image.GetOrigin() and out.GetSpacing() == image.GetSpacing()
        assert out.GetDirection() == image.GetDirection()
    agree = float((sitk.GetArrayFromImage(gpu) == sitk.GetArrayFromImage(cpu)).mean())
    assert agree >= 0.995


def test_a_real_cuda_out_of_memory_finishes_on_the_cpu(tiny_package):
    """The GPU capped just above what it holds: the real OutOfMemoryError moves that call to the CPU, the result
    equals the CPU's, and once the cap is lifted the same segmenter runs on the GPU again."""
    from AbdomenSegLib.inference.segmenter import Segmenter
    from AbdomenSegLib.io.phantom import make_phantom

    image, _ = make_phantom(size=(128, 112, 72))
    messages = []
    segmenter = Segmenter(tiny_package, "cuda", log=messages.append)
    cpu = sitk.GetArrayFromImage(Segmenter(tiny_package, "cpu", log=lambda m: None).segment(image))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2**20) / total)
    try:
        capped = segmenter.segment(image)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert sum("ran out of memory" in m for m in messages) == 1 and segmenter.timings.device == "cpu"
    assert np.array_equal(sitk.GetArrayFromImage(capped), cpu)
    segmenter.segment(image)
    assert segmenter.timings.device == "cuda" and next(segmenter.network.parameters()).is_cuda
