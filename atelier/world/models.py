"""Architectures of the micro models (configs only here; torch is imported inside functions)."""

from __future__ import annotations

from dataclasses import dataclass, field

CLIP_ARCH = "atelier-micro-clip"
CONTEXT_LENGTH = 32  # micro-world captions are ~20 BPE tokens; 32 keeps the text tower cheap
VOCAB_SIZE = 49408  # open_clip's BPE vocabulary (the standard tokenizer: ids must stay < vocab_size)
EOT_ID = 49407
BOT_ID = 49406


@dataclass(frozen=True)
class Sizes:
    """Every size and step count of one training run (``FULL`` ships, ``SMOKE`` is for tests)."""

    name: str
    # CLIP (open_clip: ModifiedResNet image tower, transformer text tower)
    clip_width: int = 128  # text tower width (also the UNet's cross-attention dim)
    clip_layers: int = 4  # text tower layers
    clip_embed: int = 128
    clip_image: int = 64
    # Image tower: open_clip's ModifiedResNet (``layers`` a list), stem width 16, one bottleneck per
    # stage, attention pooling. A ViT (64 px, patch 8) never learned *where* the object is or its
    # *shape* here, not even with a supervised position head (stuck at chance over 160 steps while a
    # ResNet learned it in 100): binding "the odd-coloured patch" to its location is a two-hop
    # circuit a from-scratch ViT finds slowly; convolutions have it built in.
    clip_vision_layers: tuple[int, ...] = (1, 1, 1, 1)
    clip_vision_width: int = 16
    clip_steps: int = 1400
    clip_pairs: int = 64  # batch = 2 x pairs (each scene with a one-attribute-changed twin)
    clip_lr: float = 1e-3
    # VAE (AutoencoderKL, f4: 64 px -> 16x16x4)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_steps: int = 800
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_image: int = 64
    # VAE decoder fine-tune (encoder frozen: the latent space the UNet learns stays the same)
    vae_decoder_steps: int = 1200
    vae_decoder_batch: int = 16  # whole images at vae_image (random aspect), not crops
    vae_decoder_lr: float = 5e-4
    vae_decoder_edge: float = 0.5  # weight of the L1 loss on image gradients (sharper edges)
    # UNet
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_steps: int = 1400
    unet_batch: int = 32
    unet_lr: float = 6e-4
    unet_image: int = 64  # short side of training images (latents: /4)
    text_lr: float = 5e-5  # the text encoder (converted from CLIP's text tower) is fine-tuned gently
    # IP-Adapter (image encoder trained from scratch with the adapter, UNet frozen)
    ip_steps: int = 400
    ip_batch: int = 16
    ip_lr: float = 5e-4
    ip_tokens: int = 4
    ip_width: int = 64
    ip_layers: int = 2
    ip_image: int = 64
    checkpoint_s: float = 180.0
    extra: dict = field(default_factory=dict)


FULL = Sizes("full")
SMOKE = Sizes(
    "smoke", clip_width=32, clip_layers=1, clip_embed=32, clip_image=32, clip_vision_width=8, clip_steps=3,
    clip_pairs=4,
    vae_channels=(32, 32, 32), vae_steps=2, vae_batch=2, vae_image=32, vae_crop=16, vae_decoder_steps=2,
    vae_decoder_batch=2, unet_channels=(32, 32, 32), unet_steps=3,
    unet_batch=2, unet_image=32, ip_steps=2, ip_batch=2, ip_width=32, ip_layers=1, ip_image=32, checkpoint_s=0.0,
)


def clip_config(s: Sizes) -> dict:
    """open_clip model config (written as ``<arch>.json`` beside the weights)."""
    return {
        "embed_dim": s.clip_embed,
        "vision_cfg": {"image_size": s.clip_image, "layers": list(s.clip_vision_layers),
                       "width": s.clip_vision_width},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": VOCAB_SIZE, "width": s.clip_width,
                     "heads": max(1, s.clip_width // 32), "layers": s.clip_layers},
    }
