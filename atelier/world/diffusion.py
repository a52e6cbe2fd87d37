"""Builders for the micro text-to-image models (diffusers / transformers classes) and conversions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from atelier.world.models import BOT_ID, CONTEXT_LENGTH, EOT_ID, VOCAB_SIZE, Sizes

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
VAE_FACTOR = 4  # AutoencoderKL with 3 blocks: 64 px -> 16x16 latents


def build_vae(s: Sizes) -> Any:
    from diffusers import AutoencoderKL

    n = len(s.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=32, sample_size=s.vae_image,
    )


def build_unet(s: Sizes, cross_attention_dim: int) -> Any:
    from diffusers import UNet2DConditionModel

    c = s.unet_channels
    return UNet2DConditionModel(
        sample_size=s.unet_image // VAE_FACTOR, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=c, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=32,
    )


def text_config(s: Sizes) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=s.clip_width, intermediate_size=4 * s.clip_width,
        num_attention_heads=max(1, s.clip_width // 32), num_hidden_layers=s.clip_layers,
        max_position_embeddings=CONTEXT_LENGTH, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=BOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID, projection_dim=s.clip_embed,
    )


def clip_text_to_hf(clip_model: Any, s: Sizes) -> Any:
    """A transformers ``CLIPTextModel`` with the weights of an open_clip model's text tower.

    open_clip (nn.MultiheadAttention ``in_proj``) -> transformers (q/k/v/out projections); both use a
    causal mask, GELU and a final LayerNorm, so ``last_hidden_state`` equals open_clip's ``ln_final``
    output token by token.
    """
    import torch
    from transformers import CLIPTextModel

    sd = clip_model.state_dict()
    m = CLIPTextModel(text_config(s))
    w = s.clip_width
    new = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(s.clip_layers):
        o, n = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        qkv_w, qkv_b = sd[o + "attn.in_proj_weight"], sd[o + "attn.in_proj_bias"]
        for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
            new[n + f"self_attn.{name}.weight"] = qkv_w[k * w:(k + 1) * w]
            new[n + f"self_attn.{name}.bias"] = qkv_b[k * w:(k + 1) * w]
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            new[n + f"{b}.weight"] = sd[o + f"{a}.weight"]
            new[n + f"{b}.bias"] = sd[o + f"{a}.bias"]
    # transformers 4 names them text_model.*, 5 without the prefix: follow the model's own names
    prefixed = any(k.startswith("text_model.") for k in m.state_dict())
    new = {(k if prefixed else k.removeprefix("text_model.")): v.clone() for k, v in new.items()}
    missing, unexpected = m.load_state_dict(new, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return m.to(torch.float32)


def write_tokenizer(out: Path) -> None:
    """transformers CLIPTokenizer files (open_clip's BPE, same ids) with model_max_length = CONTEXT_LENGTH."""
    from atelier.tiny import write_clip_tokenizer

    write_clip_tokenizer(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = CONTEXT_LENGTH
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").exists():
        write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CONTEXT_LENGTH)


def tokenize(tokenizer: Any, texts: Any, device: Any) -> Any:
    return tokenizer(list(texts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def build_image_encoder(s: Sizes) -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=s.ip_width, intermediate_size=4 * s.ip_width, num_attention_heads=max(1, s.ip_width // 32),
        num_hidden_layers=s.ip_layers, image_size=s.ip_image, patch_size=8, projection_dim=s.ip_width,
        hidden_act="gelu",
    ))


def ip_adapter_init_state(unet: Any, embed_dim: int, tokens: int = 4) -> dict:
    """An IP-Adapter state dict in the original (h94) layout for ``unet``: ``image_proj.{proj,norm}`` and,
    per cross-attention layer (ids 1, 3, 5, ...), ``ip_adapter.{id}.to_k_ip`` / ``to_v_ip``, initialised
    from that layer's text ``to_k`` / ``to_v`` (as the IP-Adapter paper does)."""
    import torch

    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    state = {
        "image_proj": {
            "proj.weight": torch.randn(cross * tokens, embed_dim, generator=g) * embed_dim ** -0.5,
            "proj.bias": torch.zeros(cross * tokens),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": {},
    }
    key_id = 1
    modules = dict(unet.named_modules())
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = modules[name.removesuffix(".processor")]
        state["ip_adapter"][f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        state["ip_adapter"][f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
        key_id += 2
    return state


def ip_adapter_state(unet: Any) -> dict:
    """The trained IP-Adapter of ``unet`` (after ``_load_ip_adapter_weights``) as a flat h94-layout dict."""
    out = {}
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    for k, v in proj.state_dict().items():  # diffusers' ImageProjection names its linear image_embeds
        out[f"image_proj.{k.replace('image_embeds.', 'proj.')}"] = v
    key_id = 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().contiguous() for k, v in out.items()}


def ip_adapter_parameters(unet: Any) -> Any:
    params = list(unet.encoder_hid_proj.parameters())
    for name, proc in unet.attn_processors.items():
        if not name.endswith("attn1.processor"):
            params += list(proc.parameters())
    return params


def save_pipeline(out: Path, vae: Any, text_encoder: Any, unet: Any, s: Sizes, dtype: Any=None) -> None:
    """``StableDiffusionPipeline.save_pretrained`` of the micro model (Euler, trailing spacing)."""
    import copy

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    dtype = dtype or torch.float16
    tok_dir = out.parent / f".{out.name}-tok"
    # The shipped tokenizer / token table keep the ~830 BPE tokens the world's words need (identical ids'
    # embeddings, identical hidden states for every caption) instead of 49,408 rows: 12 MB less.
    vocab, merges, old_ids = trimmed_vocabulary(world_corpus())
    write_trimmed_tokenizer(tok_dir, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=CONTEXT_LENGTH)
    text_encoder = trim_text_encoder(text_encoder, old_ids)
    scheduler = EulerDiscreteScheduler(**BETAS, prediction_type="epsilon", timestep_spacing="trailing",
                                       steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu", dtype), text_encoder=copy.deepcopy(text_encoder).to("cpu", dtype),
        tokenizer=tokenizer, unet=copy.deepcopy(unet).to("cpu", dtype), scheduler=scheduler, safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": s.ip_image},
                                             crop_size={"height": s.ip_image, "width": s.ip_image}),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir, ignore_errors=True)


# ------------------------------------------------------------------------------ a smaller token table
COMMON_WORDS = (
    "a an the and or with without of on in at to for from by against over under near behind front "
    "background backdrop poster style image picture photo art design simple minimal bright dark light "
    "colorful colourful pastel vivid blurry watermark text logo people person low quality high detailed "
    "sky wall ground one two shape object"
)


def world_corpus() -> list[str]:
    """Every word the micro world's captions, templates and parser use, plus common prompt words."""
    import numpy as np

    from atelier.world import scene as sc

    texts = [COMMON_WORDS, " ".join(sc._SYNONYMS["shape"]) + " " + " ".join(sc._SYNONYMS["position"]),
             " ".join(sc._SYNONYMS["size"]) + " " + " ".join(sc._SYNONYMS["style"]), " ".join(sc._COLOUR_SYNONYMS)]
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = sc.sample_scene(rng)
        texts += [sc.caption(s, t) for t in range(3)] + [sc.caption(s, drop=("background", "style"))]
    return texts


def trimmed_vocabulary(texts: list[str]) -> tuple[list[str], list[tuple[str, str]], list[int]]:
    """(vocab, merges, old ids): open_clip's byte-level BPE restricted to the 512 byte tokens, the merges
    the given texts use (and every token those merges make) and the two special tokens.

    Words of ``texts`` tokenize to exactly the pieces they had; any other word falls back to shorter
    pieces (down to bytes) instead of an unknown token. Old ids index the full 49,408-token table.
    """
    import gzip

    import regex
    from open_clip.tokenizer import SimpleTokenizer, basic_clean, bytes_to_unicode, default_bpe, whitespace_clean

    tok = SimpleTokenizer()
    merges_all = [tuple(m.split()) for m in gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    ranks = {m: i for i, m in enumerate(merges_all)}
    byte_vocab = list(bytes_to_unicode().values())
    full = byte_vocab + [v + "</w>" for v in byte_vocab] + ["".join(m) for m in merges_all] + \
        ["<|startoftext|>", "<|endoftext|>"]
    full_index = {t: i for i, t in enumerate(full)}
    used: set[tuple[str, str]] = set()
    for text in texts:
        for token in regex.findall(tok.pat, whitespace_clean(basic_clean(text)).lower()):
            token = "".join(tok.byte_encoder[b] for b in token.encode("utf-8"))
            word = tuple(token[:-1]) + (token[-1] + "</w>",)
            while len(word) > 1:
                pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
                best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
                if best not in ranks:
                    break
                used.add(best)
                merged, i = [], 0
                while i < len(word):
                    if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = tuple(merged)
    merges = sorted(used, key=ranks.get)
    vocab = byte_vocab + [v + "</w>" for v in byte_vocab] + ["".join(m) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges, [full_index[t] for t in vocab]


def write_trimmed_tokenizer(out: Path, vocab: list[str], merges: list[tuple[str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": CONTEXT_LENGTH, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True}))


def trim_text_encoder(text_encoder: Any, old_ids: list[int]) -> Any:
    """A copy of ``text_encoder`` whose token table keeps only the rows ``old_ids`` (in that order)."""
    import copy

    import torch
    from transformers import CLIPTextModel

    cfg = copy.deepcopy(text_encoder.config)
    n = len(old_ids)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = n, n - 2, n - 1, n - 1
    small = CLIPTextModel(cfg)
    sd = {k: v for k, v in text_encoder.state_dict().items()}
    emb_key = next(k for k in sd if k.endswith("token_embedding.weight"))
    sd[emb_key] = sd[emb_key][torch.tensor(old_ids)].clone()
    small.load_state_dict(sd, strict=False)
    return small.to(dtype=text_encoder.dtype)
