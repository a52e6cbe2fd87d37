"""Full-size SD 1.5, SDXL and FLUX.1-schnell with random weights, built in memory for GPU timing.

The ``bench-*`` profiles measure throughput on a lent GPU that cannot reach a model hub. Speed depends
on the architecture and the tensor shapes, not on the weights' values, so each pipeline is built from
its published configs (below, as data) with seeded random weights, directly on the target device and
in the target dtype: nothing is downloaded, nothing is written to disk, and no fp32 copy of 10+ GB
passes through host memory. Images are noise.

Configs are those of the Hugging Face repos' ``*/config.json`` and ``scheduler_config.json`` (keys left
at the class defaults are omitted): stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0 (stabilityai/sdxl-turbo has the same architecture) and
black-forest-labs/FLUX.1-schnell. Parameter counts (checked in ``tests/test_fullsize.py``): SD 1.5 UNet
859,520,964; SDXL UNet 2,567,463,684; CLIP ViT-L/14 text 123,060,480; OpenCLIP bigG text with projection
694,659,840; SD / SDXL VAE 83,653,863; FLUX.1-schnell transformer 11,891,178,560 (dev, with its guidance
embedder: 11,901,408,320); T5-v1.1-XXL encoder 4,762,310,656; FLUX VAE 83,819,683.

Tokenizers are offline: CLIP's real 49,408-token BPE (``tiny.write_clip_tokenizer``) and, for T5, a small
Unigram vocabulary (``tiny._t5_tokenizer``) — the T5 encoder keeps its real 32,128-row embedding; what
timing needs from the tokenizer is the padded length (512, FluxPipeline's default max_sequence_length).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261123  # weights are seeded: the same device, dtype and library versions build the same model
BUILDER_VERSION = 1  # bump when the construction changes (it is part of the model identity)

# ------------------------------------------------------------------------------------------ configs
_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8,  # SD 1.x: 8 heads everywhere (the name is historic)
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "mid_block_scale_factor": 1,
}
SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower: SD 1.5, SDXL text_encoder, FLUX text_encoder
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SD15_SCHEDULER = ("PNDMScheduler", dict(_SCALED_LINEAR))

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],  # heads per level (64-d each)
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) token features, concatenated
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 micro-conditioning numbers x 256 + pooled bigG (1280)
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "mid_block_scale_factor": 1,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_BIGG_TEXT = {  # laion/CLIP-ViT-bigG-14's text tower, with its projection: SDXL text_encoder_2
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
    "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
SDXL_SCHEDULER = ("EulerDiscreteScheduler", {**_SCALED_LINEAR, "prediction_type": "epsilon",
                                             "interpolation_type": "linear", "timestep_spacing": "leading",
                                             "use_karras_sigmas": False, "sample_max_value": 1.0})

FLUX_SCHNELL_TRANSFORMER = {  # = FluxTransformer2DModel's defaults; dev differs only by guidance_embeds=True
    "patch_size": 1, "in_channels": 64,  # 16 latent channels x 2x2 patches
    "num_layers": 19, "num_single_layers": 38,  # double-stream (MM-DiT) and single-stream blocks
    "attention_head_dim": 128, "num_attention_heads": 24,  # inner dim 3072
    "joint_attention_dim": 4096, "pooled_projection_dim": 768,  # T5-XXL tokens, pooled CLIP-L
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
            "mid_block_add_attention": True, "force_upcast": True}
T5_XXL_ENCODER = {  # google/t5-v1_1-xxl, encoder only (FLUX text_encoder_2)
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1,
    "tie_word_embeddings": False, "is_encoder_decoder": True, "use_cache": True,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
FLUX_SCHNELL_SCHEDULER = ("FlowMatchEulerDiscreteScheduler", {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
})


@dataclass(frozen=True)
class Architecture:
    """One pipeline: its diffusers class, its networks (role -> (class, config)) and its scheduler."""

    pipeline: str
    family: str  # sd | sdxl | flux, as ModelSpec.family
    networks: dict  # role -> (class name in diffusers / transformers, config dict)
    scheduler: tuple[str, dict]
    tokenizers: tuple[str, ...]  # roles: tokenizer (CLIP), tokenizer_2 (CLIP with "!" padding, or T5)


ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture(
        pipeline="StableDiffusionPipeline", family="sd",
        networks={"unet": ("UNet2DConditionModel", SD15_UNET), "vae": ("AutoencoderKL", SD_VAE),
                  "text_encoder": ("CLIPTextModel", CLIP_L_TEXT)},
        scheduler=SD15_SCHEDULER, tokenizers=("tokenizer",),
    ),
    "sdxl": Architecture(
        pipeline="StableDiffusionXLPipeline", family="sdxl",
        networks={"unet": ("UNet2DConditionModel", SDXL_UNET), "vae": ("AutoencoderKL", SDXL_VAE),
                  "text_encoder": ("CLIPTextModel", CLIP_L_TEXT),
                  "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG_TEXT)},
        scheduler=SDXL_SCHEDULER, tokenizers=("tokenizer", "tokenizer_2"),
    ),
    "flux-schnell": Architecture(
        pipeline="FluxPipeline", family="flux",
        networks={"transformer": ("FluxTransformer2DModel", FLUX_SCHNELL_TRANSFORMER),
                  "vae": ("AutoencoderKL", FLUX_VAE), "text_encoder": ("CLIPTextModel", CLIP_L_TEXT),
                  "text_encoder_2": ("T5EncoderModel", T5_XXL_ENCODER)},
        scheduler=FLUX_SCHNELL_SCHEDULER, tokenizers=("tokenizer", "tokenizer_2"),
    ),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown full-size architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def config_sha256(name: str) -> str:
    """A stable hash of everything that decides the model: configs, scheduler, seed, builder version."""
    arch = get_architecture(name)
    blob = {"pipeline": arch.pipeline, "networks": arch.networks, "scheduler": arch.scheduler,
            "seed": SEED, "builder": BUILDER_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ building
@contextmanager
def _construct_on(device: Any, dtype: Any):
    """Parameters created inside are allocated on ``device`` in ``dtype`` and initialised there.

    ``torch.set_default_dtype`` is process-wide (it is what transformers' ``_from_config(dtype=...)``
    does too); it is restored on exit, and building happens once per process under the model cache's lock.
    """
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _network(class_name: str, config: dict):
    """Instantiate one network from its config (a diffusers model, or a transformers one)."""
    import diffusers
    import transformers

    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name)(**config)
    model_class = getattr(transformers, class_name)
    config_class = transformers.T5Config if class_name.startswith("T5") else transformers.CLIPTextConfig
    return model_class(config_class(**config))


def build_networks(name: str, device: Any="cpu", dtype: Any=None, seed: int = SEED) -> dict:
    """The architecture's networks (role -> module) with seeded random weights, eval mode.

    ``device="meta"`` builds the structure only (no memory, no initialisation): for counting parameters.
    """
    import torch

    from atelier import compat

    compat.apply()
    arch = get_architecture(name)
    dtype = dtype or torch.float32
    dev = torch.device(device)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    out = {}
    # fork_rng: seeding here leaves the caller's random state as it was
    with torch.random.fork_rng(devices=rng_devices):
        for i, (role, (class_name, config)) in enumerate(arch.networks.items()):
            torch.manual_seed(seed + i)  # one seed per network: adding a network does not change the others
            with _construct_on(dev, dtype):
                out[role] = _network(class_name, config).eval().requires_grad_(False)
    return out


def _clip_tokenizer(pad_token: str = ""):
    from transformers import CLIPTokenizer

    from atelier.tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="atelier-clip-tok-") as tmp:
        write_clip_tokenizer(Path(tmp))
        extra = {"pad_token": pad_token} if pad_token else {}
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, **extra)


def build_pipeline(name: str, device: Any="cpu", dtype: Any=None, seed: int = SEED) -> Any:
    """The full-size diffusers pipeline ``name`` (see ``ARCHITECTURES``), random weights, on ``device``.

    Args:
        name: "sd15" | "sdxl" | "flux-schnell".
        device: where the weights are allocated and initialised ("cuda", "cpu", "meta" for structure only).
        dtype: the weights' dtype (default float32). FLUX wants bfloat16 on CUDA, SD / SDXL float16.
        seed: weight seed; each network gets ``seed + its index``.

    Returns:
        A ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``FluxPipeline`` with its published
        scheduler, offline tokenizers and no safety checker. Nothing is read from or written to disk
        (but a temporary CLIP vocabulary file).
    """
    # 1. Check inputs
    arch = get_architecture(name)
    from atelier import compat

    compat.apply()
    import diffusers

    # 2. Networks, built where they will run
    parts = build_networks(name, device, dtype, seed)
    # 3. Tokenizers and scheduler
    parts["tokenizer"] = _clip_tokenizer()
    if arch.family == "sdxl":
        parts["tokenizer_2"] = _clip_tokenizer(pad_token="!")  # bigG's tokenizer pads with "!" (id 0)
    elif arch.family == "flux":
        from atelier.tiny import _t5_tokenizer

        parts["tokenizer_2"] = _t5_tokenizer()  # pads to 512 tokens, like the real one
    scheduler_class, scheduler_config = arch.scheduler
    parts["scheduler"] = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    # 4. Assemble the pipeline
    extra = {}
    if arch.family == "sd":
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif arch.family == "sdxl":
        extra = dict(force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe = getattr(diffusers, arch.pipeline)(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
