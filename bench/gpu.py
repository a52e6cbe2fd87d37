"""The GPU bench (issue 13, item 5): atelier's model stages at full size on one GPU, in one go, offline.

Sections, in this order (each one timed, its peak GPU memory read with ``torch.cuda.max_memory_allocated``,
the results file rewritten after it):

1. ``drafts``: SDXL with an LCM scheduler, 4 steps, 1024², batch 1 / 4 / 8, through atelier's draft stage
   (``stages.draft.generate_drafts``) against a bare diffusers loop over the same pipeline object, dtype,
   steps and seeds, interleaved A B A B; medians.
2. ``refine``: SDXL img2img through ``stages.refine.refine`` (30 steps DPM++ 2M Karras, strength 0.55, so
   16 run; CFG 6; 1024²; batch 2) with a random IP-Adapter of the real SDXL shapes.
3. ``flux``: FLUX.1-schnell, 4 steps, 1024², batch 4, through the draft stage (bf16).
4. ``upscale``: Real-ESRGAN x4plus (RRDBNet, random weights) 1024² -> 4096², tiled, through
   ``stages.postedit.upscale``.
5. ``campaign``: the demo campaign (``campaigns/tiny-demo.yaml``) with each ``bench-*`` profile, cold and
   unchanged re-run, each ``atelier run`` in its own process (``bench.campaign_overhead``'s measures).

Every model is built from its published config with seeded random weights (``atelier.fullsize``): nothing
is downloaded, which is why the IP-Adapter and the x4plus weights are random too (speed depends on the
shapes, not the values). fp16 on CUDA, bf16 for FLUX (as ``atelier.models`` loads them).

MFU of each model section: the FLOPs of one denoiser (or RRDBNet) call are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the call's real inputs, per sample (or per pixel), and
multiplied by the samples (pixels) every call of the section processed: steps x batch, x2 under CFG,
counted by a forward hook rather than assumed. MFU = those FLOPs / wall seconds / the device's dense
bf16/fp16 peak (``PEAK_DENSE_FLOPS``; unknown device: MFU omitted, achieved TFLOP/s still given). Only
the denoiser's FLOPs count: text encoders and the VAE run inside the wall time but not in the numerator.

A global time guard (``--budget``, 450 s) skips sections that no longer fit and, at the deadline, cuts
the one running; what was measured is written either way (``gpu.json`` + ``gpu.md`` under ``--out``).
``--smoke`` runs every section with tiny models and a few pixels on CPU (the test suite keeps it working).

Usage: python -m bench.gpu [--smoke] [--out DIR] [--budget S] [--sections drafts refine ...]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (bench/gpu.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atelier.profiles import ModelSpec, get_profile  # light: data only, no torch

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}

# Dense (no sparsity) bf16 / fp16 tensor-core peaks, FLOP/s; first substring of the device name that matches.
PEAK_DENSE_FLOPS = (
    ("H100 PCIe", 756e12),  # before "H100": a PCIe card must not be credited with the SXM peak
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)
# what the campaign section needs beyond the model sections (diffusers, realesrgan, basicsr)
CAMPAIGN_MODULES = ("prefect", "sqlalchemy", "alembic", "open_clip", "gfpgan", "typer", "rich")
# small models the campaign's profiles share, built here on CPU by --prepare (a lent GPU cannot fetch the ncnn package)
PREPARED = REPO / ".atelier" / "gpu-bench-models"
SECTIONS = ("drafts", "refine", "flux", "upscale", "campaign")
X4PLUS = dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)  # RealESRGAN_x4plus


@dataclass(frozen=True)
class Sizes:
    """What each section runs: the full sizes for a GPU, or the smoke sizes for CPU."""

    name: str
    budget_s: float  # default --budget: the whole run, imports and model builds included
    sdxl: ModelSpec
    flux: ModelSpec
    draft_side: int = 1024
    draft_steps: int = 4
    draft_images: int = 8  # per timed call of a side; every batch size makes the same images
    draft_batches: tuple[int, ...] = (1, 4, 8)
    rounds: int = 3  # A B rounds per batch size (median)
    refine_side: int = 1024
    refine_steps: int = 30  # the bench-sdxl-turbo profile's refine: DPM++ 2M Karras, strength 0.55 (16 run), CFG 6
    refine_images: int = 2
    repeats: int = 3  # timed repeats of refine / flux / upscale (median), after one warm-up
    flux_side: int = 1024
    flux_images: int = 4
    upscale_side: int = 1024  # input; x4 out
    upscale_tiles: tuple[int, ...] = (256, 512)
    rrdb: dict = field(default_factory=lambda: dict(X4PLUS))
    campaign_brief: str = "campaigns/tiny-demo.yaml"  # the demo campaign; the profile is given on the command line
    campaign_profiles: tuple[str, ...] = ("bench-sdxl-turbo", "bench-sd15-lcm", "bench-flux-schnell")
    threads: int | None = None  # torch CPU threads (smoke: 1, since a shared 2-core machine thrashes with more)
    # seconds a section (or campaign profile) needs at least: started only when that much is left
    need_s: dict = field(default_factory=lambda: {"drafts": 100, "refine": 40, "flux": 70, "upscale": 30, "campaign": 110,
                                                  "bench-sdxl-turbo": 110, "bench-sd15-lcm": 90, "bench-flux-schnell": 200})


FULL = Sizes("full", 450, sdxl=get_profile("bench-sdxl-turbo").draft_model, flux=get_profile("bench-flux-schnell").draft_model)
SMOKE = Sizes(
    "smoke", 300,
    sdxl=ModelSpec("tiny-sdxl", "diffusers", "tiny:sdxl", family="sdxl"),
    flux=ModelSpec("tiny-flux", "diffusers", "tiny:flux", family="flux"),
    draft_side=64, draft_images=2, draft_batches=(1, 2), rounds=1, refine_side=64, refine_steps=4, repeats=1, flux_side=64,
    flux_images=2, upscale_side=32, upscale_tiles=(16,), rrdb=dict(X4PLUS, num_feat=8, num_block=1, num_grow_ch=4),
    campaign_brief="", campaign_profiles=("tiny",), threads=1, need_s={},
)


# ------------------------------------------------------------------------------------------ time guard
class TimeUp(BaseException):
    """The bench's deadline passed. A BaseException, so no library's ``except Exception`` swallows it."""


class Clock:
    """The run's deadline: ``left()`` for planning, and a SIGALRM at the deadline that raises ``TimeUp``."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def arm(self) -> None:
        def on_alarm(signum: int, frame: Any) -> None:
            raise TimeUp(f"the bench's {self.deadline - self.t0:.0f} s budget is spent")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left()))

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class Context:
    """What every section gets: sizes, device, the clock, a scratch folder, a progress printer, a flush."""

    sizes: Sizes
    device: str
    peak_flops: float | None
    clock: Clock
    tmp: Path
    models_dir: Path
    flush: Callable[[], None]
    reserve_s: float = 0.0  # seconds the later sections need: a section stops repeating when it would eat them

    def say(self, msg: str) -> None:
        print(f"[{self.clock.elapsed():6.1f}s] {msg}", flush=True)

    def can_repeat(self) -> bool:
        return self.clock.left() > self.reserve_s


# --------------------------------------------------------------------------------------- GPU helpers
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    """Peak GPU memory allocated by tensors since the last ``_reset_peak`` (None on CPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _free() -> None:
    """Drop every cached model, so the next section's peak memory is its own."""
    from atelier.models import process_cache

    process_cache().clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_flops_for(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_DENSE_FLOPS if key in device_name), None)


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


class FlopMeter:
    """Counts what a module processes (samples, or pixels) over its calls, and the FLOPs of one unit.

    A forward pre-hook adds each call's units (``units(x)`` of the call's first tensor input: the batch
    of a UNet / transformer call, so CFG's doubled batch counts twice; batch x H x W for a conv net).
    ``count_flops()`` re-runs the first call it saw under ``FlopCounterMode`` and divides by its units.
    """

    def __init__(self, module: Any, units: Callable[[Any], int]) -> None:
        self.module, self.units_of = module, units
        self.units = 0
        self.flops_per_unit: float | None = None
        self._first: tuple | None = None
        self._counting = False
        self._handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._counting:
            return
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states", kwargs.get("x")))
        self.units += self.units_of(x)
        if self._first is None:
            self._first = (args, kwargs, self.units_of(x))

    def count_flops(self) -> float:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        if self._first is None:
            raise RuntimeError("count_flops() before the module was called")
        args, kwargs, units = self._first
        self._counting = True
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.module(*args, **kwargs)
        finally:
            self._counting = False
        self._first = None  # free the captured inputs
        self.flops_per_unit = counter.get_total_flops() / units
        return self.flops_per_unit

    def take(self) -> int:
        """Units since the last take."""
        units, self.units = self.units, 0
        return units

    def remove(self) -> None:
        self._handle.remove()


def _batch(x: Any) -> int:
    return int(x.shape[0])


def _pixels(x: Any) -> int:
    return int(x.shape[0] * x.shape[-2] * x.shape[-1])


def _mfu(ctx: Context, flops: float, seconds: float) -> dict:
    achieved = flops / seconds if seconds > 0 else 0.0
    return {"flops": flops, "tflops_per_s": achieved / 1e12,
            "mfu": achieved / ctx.peak_flops if ctx.peak_flops else None}


def _noise_png(path: Path, side: int, seed: int) -> Path:
    """A smooth image with some noise (content does not change any model's speed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1), np.full((side, side), 128.0)], -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


# --------------------------------------------------------------------------------- random IP-Adapter
def denoiser_skeleton(spec: ModelSpec, models_dir: Path) -> Any:
    """The spec's UNet / FLUX transformer as structure: on ``meta`` for ``random:`` sources (no memory),
    built from the saved config for the others (tiny models: small on CPU)."""
    if spec.source.startswith("random:"):
        from atelier import fullsize

        nets = fullsize.build_networks(spec.source.removeprefix("random:"), "meta")
        return nets.get("unet", nets.get("transformer"))
    from atelier.sources import resolve

    root = resolve(spec, models_dir)
    if spec.family == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(root / "transformer"))
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))


def build_ip_adapter(spec: ModelSpec, models_dir: Path, out: Path, seed: int = 20261213) -> ModelSpec:
    """A random-weight IP-Adapter of the right shapes for ``spec``'s denoiser, written under ``out``.

    The real ones (h94 for SD / SDXL, XLabs for FLUX) cannot be downloaded on a lent GPU, and the tiny one
    fits only the tiny UNet. Same layouts and keys as ``atelier.tiny``'s adapters: ``image_proj`` (4 image
    tokens) + ``ip_adapter.{id}.to_{k,v}_ip`` per cross-attention layer (h94); ``ip_adapter_proj_model`` +
    ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` (XLabs). The image encoder is the
    tiny CLIP vision tower (its cost is negligible beside the denoiser's either way). fp16 weights.
    """
    import torch
    from safetensors.torch import save_file

    from atelier import compat, tiny

    compat.apply()
    net = denoiser_skeleton(spec, models_dir)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=0.05: (torch.randn(*shape, generator=gen) * s).half()  # noqa: E731
    emb, tokens = tiny.CLIP_EMBED_DIM, 4
    if spec.family == "flux":
        cfg = net.config
        inner, dim = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["joint_attention_dim"]
        state = {"ip_adapter_proj_model.proj.weight": rand(dim * tokens, emb),
                 "ip_adapter_proj_model.proj.bias": torch.zeros(dim * tokens, dtype=torch.half),
                 "ip_adapter_proj_model.norm.weight": torch.ones(dim, dtype=torch.half),
                 "ip_adapter_proj_model.norm.bias": torch.zeros(dim, dtype=torch.half)}
        for i in range(cfg["num_layers"]):
            for kv in ("k", "v"):
                state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = rand(inner, dim, s=0.2)
                state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = torch.zeros(
                    inner, dtype=torch.half)
        folder, subfolder, weight = out, "", "ip_adapter.safetensors"
    else:
        dim = net.config.cross_attention_dim
        state = {"image_proj.proj.weight": rand(dim * tokens, emb),
                 "image_proj.proj.bias": torch.zeros(dim * tokens, dtype=torch.half),
                 "image_proj.norm.weight": torch.ones(dim, dtype=torch.half),
                 "image_proj.norm.bias": torch.zeros(dim, dtype=torch.half)}
        key_id = 1  # diffusers numbers the cross-attention layers 1, 3, 5, ... in attn_processors order
        for name in net.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            hidden = net.get_submodule(name.removesuffix(".processor")).to_k.out_features
            state[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, dim)
            state[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, dim)
            key_id += 2
        folder, subfolder, weight = out / "models", "models", "ip-adapter_random.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    tiny._ip_adapter_image_encoder(folder / "image_encoder", emb)
    save_file(state, str(folder / weight))
    return ModelSpec(f"random-ip-adapter-{spec.name}", "ip-adapter", str(out), subfolder=subfolder, weight_name=weight)


# ------------------------------------------------------------------------------------------ sections
def section_drafts(ctx: Context, out: dict) -> None:
    """SDXL-LCM drafts: atelier's draft stage (A) vs a bare diffusers loop (B), interleaved, per batch size."""
    import torch

    from atelier.models import Models
    from stages import draft

    s, spec = ctx.sizes, ctx.sizes.sdxl
    side, steps, n = s.draft_side, s.draft_steps, s.draft_images
    out.update(model=spec.source, size=[side, side], steps=steps, scheduler="lcm", guidance=1.0, images=n, batches={})
    models = Models.at(ctx.models_dir)
    # 1. Build the pipeline (random weights, on the device) outside the timing
    t0 = time.perf_counter()
    pipe = models.pipeline(spec, "txt2img", "lcm")
    out["build_s"] = time.perf_counter() - t0
    out["dtype"] = str(pipe.unet.dtype)
    ctx.say(f"drafts: {spec.source} built in {out['build_s']:.1f} s ({out['dtype']})")
    meter = FlopMeter(pipe.unet, _batch)
    seeds = tuple(range(n))

    def atelier(batch: int) -> None:
        draft.generate_drafts(draft.DraftRequest(
            prompt="a red bicycle", negative="", width=side, height=side, steps=steps, guidance=1.0, scheduler="lcm",
            model=spec, seeds=seeds, indices=tuple(range(n)), batch_size=batch), models)

    def bare(batch: int) -> None:  # what a person writes by hand: same pipe, seeds, one generator per image
        for i in range(0, n, batch):
            chunk = seeds[i : i + batch]
            gens = [torch.Generator(device=ctx.device).manual_seed(x) for x in chunk]
            pipe(["a red bicycle"] * len(chunk), width=side, height=side, num_inference_steps=steps,
                 guidance_scale=1.0, generator=gens)

    try:
        for batch in s.draft_batches:
            # 2. Warm up at this batch size (allocator, kernels); the first UNet call's FLOPs are counted
            _reset_peak()
            atelier(batch)
            if meter.flops_per_unit is None:
                out["unet_flops_per_sample"] = meter.count_flops()
            meter.take()
            # 3. Interleaved rounds: A B A B ...
            times: dict[str, list[float]] = {"atelier": [], "bare": []}
            units: dict[str, int] = {}
            for r in range(s.rounds):
                if r and not ctx.can_repeat():
                    break
                for side_name, fn in (("atelier", atelier), ("bare", bare)):
                    times[side_name].append(_timed(lambda fn=fn, batch=batch: fn(batch)))
                    units[side_name] = meter.take()
                ctx.say(f"drafts: batch {batch} round {r + 1}: atelier {times['atelier'][-1]:.2f} s, "
                        f"bare {times['bare'][-1]:.2f} s ({n} images)")
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"atelier_s": times["atelier"], "bare_s": times["bare"], "unet_samples": units["atelier"],
                   "atelier_images_per_s": n / med["atelier"], "bare_images_per_s": n / med["bare"],
                   "ratio": med["bare"] / med["atelier"], "peak_gpu_gib": _peak_gib(),
                   **_mfu(ctx, out["unet_flops_per_sample"] * units["atelier"], med["atelier"])}
            out["batches"][str(batch)] = row
            ctx.flush()
    finally:
        meter.remove()
    b = out["batches"]
    lo, hi = str(s.draft_batches[0]), str(s.draft_batches[-1])
    if lo in b and hi in b:
        out["batching_gain"] = b[hi]["bare_images_per_s"] / b[lo]["bare_images_per_s"]


def section_refine(ctx: Context, out: dict) -> None:
    """SDXL img2img refine through atelier's refine stage, with a random IP-Adapter of the real shapes."""
    from atelier.models import Models
    from stages import refine
    from stages.protocol import Input

    s, spec = ctx.sizes, ctx.sizes.sdxl
    st = replace(get_profile("bench-sdxl-turbo").refine, steps=s.refine_steps)  # DPM++ 2M Karras, CFG 6, batch 2
    side, n = s.refine_side, s.refine_images
    out.update(model=spec.source, size=[side, side], steps=st.steps, strength=st.strength, guidance=st.guidance,
               scheduler=st.scheduler, batch=st.batch_size, images=n)
    # 1. Inputs and the IP-Adapter, outside the timing
    t0 = time.perf_counter()
    ip = build_ip_adapter(spec, ctx.models_dir, ctx.tmp / "ip-refine")
    out["ip_adapter_build_s"] = time.perf_counter() - t0
    inits = tuple(Input(f"init{i}", _noise_png(ctx.tmp / f"init{i}.png", side, i)) for i in range(n))
    refs = (Input("ref", _noise_png(ctx.tmp / "ref.png", side, 99)),)
    models = Models.at(ctx.models_dir)
    t0 = time.perf_counter()
    pipe = models.pipeline(spec, "img2img", st.scheduler, ip_adapter=ip)
    out["build_s"] = time.perf_counter() - t0
    ctx.say(f"refine: pipeline + IP-Adapter in {out['build_s']:.1f} s")
    req = refine.RefineRequest(prompt="a red bicycle", negative="blurry", width=side, height=side, steps=st.steps,
                               guidance=st.guidance, strength=st.strength, scheduler=st.scheduler,
                               ip_adapter_scale=0.6, model=spec, ip_adapter=ip, style_refs=refs, inits=inits,
                               seeds=tuple(range(n)), batch_size=st.batch_size)
    _repeat(ctx, out, "refine", pipe.unet, _batch, lambda: refine.refine(req, models), n)


def section_flux(ctx: Context, out: dict) -> None:
    """FLUX.1-schnell drafts through atelier's draft stage."""
    from atelier.models import Models
    from stages import draft

    s, spec = ctx.sizes, ctx.sizes.flux
    st = get_profile("bench-flux-schnell").draft  # 4 steps, guidance 0, flow-euler, batch 4
    side, n = s.flux_side, s.flux_images
    out.update(model=spec.source, size=[side, side], steps=st.steps, scheduler=st.scheduler, batch=min(st.batch_size, n),
               images=n)
    models = Models.at(ctx.models_dir)
    t0 = time.perf_counter()
    pipe = models.pipeline(spec, "txt2img", st.scheduler)
    out["build_s"] = time.perf_counter() - t0
    out["dtype"] = str(pipe.transformer.dtype)
    ctx.say(f"flux: {spec.source} built in {out['build_s']:.1f} s ({out['dtype']})")
    req = draft.DraftRequest(prompt="a red bicycle", negative="", width=side, height=side, steps=st.steps,
                             guidance=st.guidance, scheduler=st.scheduler, model=spec, seeds=tuple(range(n)),
                             indices=tuple(range(n)), batch_size=min(st.batch_size, n))
    _repeat(ctx, out, "flux", pipe.transformer, _batch, lambda: draft.generate_drafts(req, models), n)


def section_upscale(ctx: Context, out: dict) -> None:
    """Real-ESRGAN x4plus (random weights) through atelier's upscale stage, per tile size."""
    import torch

    from atelier import compat
    from atelier.models import Models
    from stages import postedit
    from stages.protocol import Input

    compat.apply()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    s = ctx.sizes
    side = s.upscale_side
    out.update(model="RRDBNet x4plus (random weights)", arch=s.rrdb, input=[side, side], output=[4 * side, 4 * side],
               tiles={})
    # 1. Weights file + arch.json (``Models.upscaler`` reads it), outside the timing
    folder = ctx.tmp / "x4plus"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save({"params_ema": RRDBNet(**s.rrdb).state_dict()}, folder / "x4plus-random.pth")
    (folder / "arch.json").write_text(json.dumps(s.rrdb))
    spec = ModelSpec("realesrgan-x4plus-random", "realesrgan", str(folder), arch="rrdb", weight_name="x4plus-random.pth")
    src = (Input("src", _noise_png(ctx.tmp / "upscale-src.png", side, 7)),)
    models = Models.at(ctx.models_dir)
    for tile in s.upscale_tiles:
        req = postedit.UpscaleRequest(width=4 * side, height=4 * side, tile=tile, model=spec, sources=src)
        net = models.upscaler(spec, tile).model
        row: dict = {}
        out["tiles"][str(tile)] = row
        _repeat(ctx, row, f"upscale tile {tile}", net, _pixels, lambda req=req: postedit.upscale(req, models), 1)


def _repeat(ctx: Context, out: dict, what: str, module: Any, units: Callable[[Any], int], call: Callable[[], Any],
            images: int) -> None:
    """One warm-up call (its first ``module`` call's FLOPs counted), then timed repeats; medians and MFU."""
    meter = FlopMeter(module, units)
    try:
        _reset_peak()
        warm = _timed(call)
        per_unit = meter.count_flops()
        meter.take()
        ctx.say(f"{what}: warm-up {warm:.2f} s")
        times, done = [], 0
        for r in range(ctx.sizes.repeats):
            if r and not ctx.can_repeat():
                break
            times.append(_timed(call))
            done += meter.take()
            ctx.say(f"{what}: run {r + 1}: {times[-1]:.2f} s")
        med = statistics.median(times)
        out.update(warmup_s=warm, seconds=times, median_s=med, seconds_per_image=med / images,
                   flops_per_unit=per_unit, units_per_call=done // len(times), peak_gpu_gib=_peak_gib(),
                   **_mfu(ctx, per_unit * done / len(times), med))
    finally:
        meter.remove()


# ------------------------------------------------------------------------------------------- campaign
def _smoke_brief(folder: Path) -> Path:
    """A one-deliverable brief for the smoke run: 2 drafts, keep 1, refine, 64x64, no post-editing."""
    folder.mkdir(parents=True, exist_ok=True)
    _noise_png(folder / "ref.png", 64, 3)
    brief = folder / "smoke.yaml"
    brief.write_text("campaign: gpu-bench-smoke\nprofile: tiny\nseed: 7\nbrand:\n  style_refs: [ref.png]\n"
                     "deliverables:\n  - name: one\n    prompt: \"a red bicycle\"\n    drafts: 2\n    keep: 1\n"
                     "    size: 64x64\n")
    return brief


def _child_env(threads: int | None) -> dict:
    return {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def _campaign_child(argv: list[str]) -> None:
    """In a child process: register ``<profile>-with-random-ip-adapter`` (the profile with ``ip`` as its
    IP-Adapter), then one ``atelier run`` with it (``bench.run_once``: its last line is a JSON summary)."""
    base, ip_json, brief, home, *extra = argv
    from atelier import profiles

    ip = ModelSpec(**json.loads(ip_json))
    name = f"{base}-with-random-ip-adapter"
    # this process's registry only: a child made for this one run
    profiles.PROFILES[name] = replace(profiles.get_profile(base), name=name, ip_adapter=ip)
    sys.argv = ["bench.run_once", brief, home, "--profile", name, *extra]
    from bench import run_once

    run_once.main()


def _run_child(ctx: Context, base: str, ip: ModelSpec, brief: Path, home: Path, extra: list[str]) -> dict:
    ip_json = json.dumps({k: getattr(ip, k) for k in ("name", "kind", "source", "subfolder", "weight_name")})
    cmd = [sys.executable, "-m", "bench.gpu", "--campaign-child", base, ip_json, str(brief), str(home), *extra]
    timeout = max(5.0, ctx.clock.left() - 5)
    env = _child_env(ctx.sizes.threads)
    if importlib.util.find_spec("c2pa") is None:
        env["ATELIER_C2PA"] = "off"  # export without signing: c2pa-python (16 MB) may not travel to a lent GPU
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"atelier run exited {res.returncode}:\n{res.stdout[-1500:]}\n{res.stderr[-2500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def section_campaign(ctx: Context, out: dict) -> None:
    """The demo campaign with each bench profile: cold run, then the unchanged re-run, in a fresh home each."""
    import inspect

    from atelier.cli import run as run_command
    from atelier.sources import resolve
    from bench.campaign_overhead import _measure
    from store import open_store, queries

    s = ctx.sizes
    missing = [m for m in CAMPAIGN_MODULES if importlib.util.find_spec(m) is None]
    if missing:  # say so at once rather than fail in each child
        raise ImportError(f"{', '.join(missing)} (a whole `atelier run` needs atelier's dependencies)")
    c2pa = importlib.util.find_spec("c2pa") is not None
    brief = REPO / s.campaign_brief if s.campaign_brief else _smoke_brief(ctx.tmp / "brief")
    # a throwaway Prefect server per run where `atelier run` offers one (no server left running after the bench)
    extra = ["--ephemeral"] if "ephemeral" in inspect.signature(run_command.run).parameters else []
    out.update(brief=str(brief.relative_to(REPO) if brief.is_relative_to(REPO) else brief.name), extra_args=extra,
               c2pa_signing=c2pa, profiles={})
    # 1. The small models every profile shares (CLIP, face restore, upscale), built once outside the timing;
    # from PREPARED when it is there (its converted Real-ESRGAN weights spare the 43 MB ncnn package)
    shared = ctx.tmp / "campaign-models"
    if PREPARED.is_dir():
        shutil.copytree(PREPARED, shared)
    first = get_profile(s.campaign_profiles[0])
    for spec in (first.clip, first.face, first.upscale):
        resolve(spec, shared)
    for base in s.campaign_profiles:
        need = s.need_s.get(base, 0)
        if ctx.clock.left() < need + ctx.reserve_s:
            out["profiles"][base] = {"status": "skipped", "reason": f"time: {ctx.clock.left():.0f} s left, needs ~{need} s"}
            ctx.say(f"campaign: {base} skipped (time)")
            continue
        row: dict = {"status": "running"}
        out["profiles"][base] = row
        try:
            prof = get_profile(base)
            ip = build_ip_adapter(prof.refine_model, ctx.models_dir, ctx.tmp / f"ip-{base}")
            home = ctx.tmp / f"home-{base}"
            shutil.copytree(shared, home / "models")
            ctx.say(f"campaign: {base}: cold run")
            cold_child = _run_child(ctx, base, ip, brief, home, extra)
            ctx.say(f"campaign: {base}: re-run")
            rerun_child = _run_child(ctx, base, ip, brief, home, extra)
            with open_store(home).sessions() as session:
                run_ids = [r.id for r in reversed(queries.runs(session))]
            cold, rerun = _measure(home, run_ids[0], cold_child), _measure(home, run_ids[1], rerun_child)
            row.update(status="ok", cold=cold, rerun=rerun, rerun_ratio=rerun["run_wall_s"] / cold["run_wall_s"],
                       by_stage={"cold": cold_child["by_stage"], "rerun": rerun_child["by_stage"]})
            ctx.say(f"campaign: {base}: cold {cold['run_wall_s']:.1f} s, overhead {cold['overhead']:.1%}; "
                    f"re-run {rerun['run_wall_s']:.2f} s, {rerun['model_calls']} model calls")
        except subprocess.TimeoutExpired:
            row.update(status="cut", reason="time: the run outlasted the bench's budget")
        except Exception as exc:  # noqa: BLE001 - one profile's failure must not lose the others
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[-4000:])
            ctx.say(f"campaign: {base}: error: {type(exc).__name__}")
        ctx.flush()
    if not any(r.get("status") == "ok" for r in out["profiles"].values()):
        raise RuntimeError("no campaign profile ran: " + "; ".join(f"{k}: {v.get('reason') or v.get('error', '')[:200]}"
                                                                    for k, v in out["profiles"].items()))


RUNNERS: dict[str, Callable[[Context, dict], None]] = {
    "drafts": section_drafts, "refine": section_refine, "flux": section_flux, "upscale": section_upscale,
    "campaign": section_campaign,
}


# --------------------------------------------------------------------------------------------- output
def _f(x: Any, fmt: str, unit: str = "") -> str:
    return "-" if x is None else f"{format(x, fmt)}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table(res: dict) -> list[tuple]:
    """The Markdown table's rows: one or two per measure; a skipped or failed section says why."""
    rows: list[tuple] = [("section", "measure", "value")]
    sec = res["sections"]
    for name in SECTIONS:
        r = sec.get(name)
        if r is None:
            continue
        if r.get("status") != "ok":
            rows.append((name, r.get("status", "?"), r.get("reason") or (r.get("error", "")[:160].replace("\n", " "))))
            if r.get("status") not in ("cut", "error"):
                continue
        if name == "drafts" and r.get("batches"):
            head = f"SDXL-LCM {r['steps']} steps {r['size'][0]}², {r['images']} images"
            for b, x in r["batches"].items():
                rows.append((name, f"{head}, batch {b}: images/s atelier / bare (ratio)",
                             f"{x['atelier_images_per_s']:.2f} / {x['bare_images_per_s']:.2f} ({x['ratio']:.3f})"))
                rows.append((name, f"batch {b}: peak GPU memory / UNet TFLOP/s / MFU",
                             f"{_f(x['peak_gpu_gib'], '.1f', ' GiB')} / {x['tflops_per_s']:.1f} / {_pct(x['mfu'])}"))
            if "batching_gain" in r:
                rows.append((name, "bare images/s, largest / smallest batch", f"{r['batching_gain']:.2f}"))
        for key, label in (("refine", "SDXL img2img {steps} steps x {strength} (CFG {guidance}) {size[0]}², batch {batch}"),
                           ("flux", "FLUX.1-schnell {steps} steps {size[0]}², batch {batch}")):
            if name == key and "median_s" in r:
                rows.append((name, label.format(**r) + ": s per image / peak GPU memory",
                             f"{r['seconds_per_image']:.2f} s / {_f(r['peak_gpu_gib'], '.1f', ' GiB')}"))
                rows.append((name, "denoiser TFLOP/s / MFU", f"{r['tflops_per_s']:.1f} / {_pct(r['mfu'])}"))
        if name == "upscale":
            for tile, x in r.get("tiles", {}).items():
                if "median_s" in x:
                    rows.append((name, f"x4plus {r['input'][0]}² -> {r['output'][0]}², tile {tile}: s / peak GPU memory / MFU",
                                 f"{x['median_s']:.2f} s / {_f(x['peak_gpu_gib'], '.2f', ' GiB')} / {_pct(x['mfu'])}"))
        if name == "campaign":
            for prof, x in r.get("profiles", {}).items():
                if x.get("status") != "ok":
                    rows.append((name, f"{prof}: {x.get('status')}", x.get("reason") or x.get("error", "")[:160]))
                    continue
                c, rr = x["cold"], x["rerun"]
                rows.append((name, f"{prof}: cold run wall / in model calls / overhead",
                             f"{c['run_wall_s']:.1f} s / {c['model_s']:.1f} s / {c['overhead']:.1%}"))
                rows.append((name, f"{prof}: re-run wall (/ cold) / model calls / start-up apart",
                             f"{rr['run_wall_s']:.2f} s ({x['rerun_ratio']:.1%}) / {rr['model_calls']} / "
                             f"{c['startup_s']:.1f} s"))
    return rows


def write(out_dir: Path, res: dict) -> None:
    """``gpu.json`` and ``gpu.md``, each written whole then renamed (a kill mid-write keeps the last one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, *rows = table(res)
    dev = res["device"]
    md = (f"GPU bench ({res['mode']}), {res['started_at']}: {dev['name']}, peak {_f(dev['peak_tflops'], '.0f')} "
          f"TFLOP/s dense bf16/fp16, {res['elapsed_s']:.0f} s of a {res['budget_s']:.0f} s budget.\n\n")
    md += "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    for name, text in (("gpu.json", json.dumps(res, indent=2, default=str)), ("gpu.md", md)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


# ----------------------------------------------------------------------------------------------- main
def prepare(folder: Path, sizes: Sizes) -> int:
    """Build the campaign profiles' shared small models (tiny CLIP, tiny GFPGAN, the compact Real-ESRGAN
    converted from ncnn) into ``folder``, to carry to a lent GPU beside the repository."""
    from atelier import compat
    from atelier.sources import resolve

    compat.apply()
    first = get_profile(sizes.campaign_profiles[0])
    for spec in (first.clip, first.face, first.upscale):
        print(f"{spec.name}: {resolve(spec, folder)}", flush=True)
    return 0


def _device_info(peak_override: float | None) -> dict:
    import torch

    from bench.common import machine

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, props.total_memory / 2**30
    else:
        name, memory = "cpu", None
    peak = peak_override * 1e12 if peak_override else peak_flops_for(name)
    return {"name": name, "memory_gib": memory, "peak_tflops": peak / 1e12 if peak else None,
            "peak_source": "--peak-tflops" if peak_override else ("table" if peak else "unknown device: MFU omitted"),
            "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--campaign-child"]:
        _campaign_child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few pixels, CPU is fine (< 1 min)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for gpu.json and gpu.md")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450; smoke 300)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--prepare", action="store_true",
                    help=f"only build the campaign's small shared models into {PREPARED.relative_to(REPO)} (CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16/fp16 peak, if not in the table")
    args = ap.parse_args(argv)

    for k, v in OFFLINE_ENV.items():  # before diffusers / transformers / prefect are imported
        os.environ.setdefault(k, v)
    sizes = SMOKE if args.smoke else FULL
    if args.prepare:
        return prepare(PREPARED, sizes)
    clock = Clock(args.budget or sizes.budget_s)
    from atelier import compat

    compat.apply()
    from atelier.models import device

    dev = device()
    if sizes.threads:
        import torch

        torch.set_num_threads(sizes.threads)
    info = _device_info(args.peak_tflops)
    res: dict = {"bench": "gpu", "mode": sizes.name, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "budget_s": clock.deadline - clock.t0, "elapsed_s": 0.0, "device": info, "sections": {}}
    tmp = Path(tempfile.mkdtemp(prefix="atelier-gpu-bench-"))

    def flush() -> None:
        res["elapsed_s"] = clock.elapsed()
        write(args.out, res)

    ctx = Context(sizes, dev, info["peak_tflops"] * 1e12 if info["peak_tflops"] else None, clock, tmp, tmp / "models",
                  flush)
    ctx.say(f"GPU bench ({sizes.name}) on {info['name']} ({dev}); budget {res['budget_s']:.0f} s; results in {args.out}")
    if not args.smoke and dev != "cuda":
        ctx.say("warning: no CUDA device; the full sizes on CPU will not finish in the budget (use --smoke)")
    clock.arm()
    try:
        chosen = [n for n in SECTIONS if n in args.sections]
        for i, name in enumerate(chosen):
            ctx.reserve_s = sum(sizes.need_s.get(n, 0) for n in chosen[i + 1 :])
            need = sizes.need_s.get(name, 0)
            out: dict = {"status": "running"}
            res["sections"][name] = out
            if clock.left() < need:
                out.update(status="skipped", reason=f"time: {clock.left():.0f} s left, needs ~{need} s")
                ctx.say(f"{name}: skipped ({out['reason']})")
                flush()
                continue
            ctx.say(f"{name}: start")
            t0 = time.perf_counter()
            try:
                RUNNERS[name](ctx, out)
                out["status"] = "ok"
            except TimeUp as exc:
                out.update(status="cut", reason=str(exc))
                ctx.say(f"{name}: cut ({exc})")
            except ImportError as exc:
                out.update(status="skipped", reason=f"missing package: {exc}")
                ctx.say(f"{name}: skipped (missing package: {exc})")
            except Exception as exc:  # noqa: BLE001 - a section's failure is recorded; the others still run
                out.update(status="error", error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc()[-4000:])
                ctx.say(f"{name}: error: {type(exc).__name__}: {str(exc)[:300]}")
            out["section_s"] = time.perf_counter() - t0
            _free()
            flush()
            if out["status"] == "cut":
                break
    except TimeUp:
        pass  # the deadline fell between sections
    finally:
        clock.disarm()
    for name in SECTIONS:
        if name in args.sections and res["sections"].get(name, {}).get("status") in (None, "running"):
            res["sections"][name] = {"status": "skipped", "reason": "time: the budget was spent"}
    flush()
    ctx.say(f"done in {clock.elapsed():.0f} s: " + ", ".join(f"{k} {v['status']}" for k, v in res["sections"].items()))
    print((args.out / "gpu.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
