"""Micro models: the training entry point (smoke) produces loadable files in the ordinary formats, and
a resumed run is the uninterrupted run. Seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from atelier.world import train

    root = tmp_path_factory.mktemp("micro-smoke")
    assert train.main(["--smoke", "--out", str(root / "out"), "--work", str(root / "work"), "--threads", "1",
                       "--seed", "3"]) == 0
    return root


def test_smoke_training_exports_every_model(smoke):
    out = smoke / "out"
    assert (out / "clip" / "atelier-micro-clip.json").exists()
    assert (out / "clip" / "open_clip_model.safetensors").exists()
    index = json.loads((out / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / "sd" / part).is_dir(), part
    assert (out / "ip-adapter" / "models" / "ip-adapter_micro.safetensors").exists()
    assert (out / "ip-adapter" / "models" / "image_encoder" / "config.json").exists()
    rec = json.loads((out / "training.json").read_text())
    assert all(rec[s]["done"] for s in ("clip", "vae", "vae_decoder", "unet", "ip_adapter"))
    assert {"psnr_db_before", "psnr_db"} <= set(rec["vae_decoder"])
    import torch
    from safetensors.torch import load_file

    w = load_file(str(out / "ip-adapter" / "models" / "ip-adapter_micro.safetensors"))
    assert {"image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"} <= set(w)
    assert all(v.dtype == torch.float16 for v in w.values())


def test_smoke_clip_loads_through_atelier(smoke, tmp_path):
    from atelier.world import render, sample_scene
    from atelier.world.loading import embed_images, embed_texts, load_clip, specs

    clip = load_clip(specs(smoke / "out")["clip"], tmp_path)
    x = embed_images(clip, [render(sample_scene(np.random.default_rng(0)), 112, 64)])
    t = embed_texts(clip, ["a red circle", "a blue square on a white background"])
    assert x.shape == (1, 32) and t.shape == (2, 32)
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-4)


def test_text_encoder_is_the_clip_text_tower(smoke):
    """The diffusers text encoder starts as an exact conversion of CLIP's text tower."""
    import torch

    from atelier.world import train
    from atelier.world.diffusion import clip_text_to_hf, load_tokenizer, tokenize
    from atelier.world.models import SMOKE

    run = train.Run(SMOKE, smoke / "out", smoke / "work", 3, "cpu")
    clip, tok = train.load_trained_clip(run)
    hf = clip_text_to_hf(clip, SMOKE).eval()
    texts = ["a large red circle on the left on a blue background, striped style", "a star"]
    ids = tokenize(load_tokenizer(smoke / "tok"), texts, "cpu")
    oc = tok(texts)
    assert torch.equal(ids[0, :12], oc[0, :12]) and torch.equal(ids[1, :4], oc[1, :4])  # same BPE ids
    assert ids[1, 4] == 49407 and oc[1, 4] == 0  # only the padding differs (<eot> vs 0)
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        ref = clip.ln_final(x)
        got = hf(ids).last_hidden_state
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()


def test_smoke_pipeline_loads_with_diffusers_and_runs_every_mode(smoke, tmp_path):
    import torch
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    from atelier.world import render, sample_scene
    from atelier.world.loading import pipeline, specs

    pipe = AutoPipelineForText2Image.from_pretrained(smoke / "out" / "sd", local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    sp = specs(smoke / "out")
    t2i = pipeline(sp["sd"], tmp_path, "txt2img", "lcm")
    img = t2i("a red circle", width=48, height=32, num_inference_steps=2, guidance_scale=1.0,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (48, 32)  # non-square latents
    ref = render(sample_scene(np.random.default_rng(1)), 64, 64)
    i2i = pipeline(sp["sd"], tmp_path, "img2img", "euler", ip_adapter=sp["ip_adapter"])
    i2i.set_ip_adapter_scale(0.6)
    out = i2i("a red circle", image=img.resize((64, 48)), ip_adapter_image=[[ref, ref]], strength=0.5,
              num_inference_steps=4, guidance_scale=4.0).images[0]
    assert out.size == (64, 48)
    inp = pipeline(sp["sd"], tmp_path, "inpaint", "dpm++-2m-karras", ip_adapter=sp["ip_adapter"])
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 24))
    out2 = inp("a blue square", image=out, mask_image=mask, ip_adapter_image=[[ref]], width=64, height=48,
               strength=0.99, num_inference_steps=3, guidance_scale=4.0).images[0]
    assert out2.size == (64, 48)


def test_resumed_training_equals_uninterrupted(tmp_path):
    """Stop after 2 steps, resume to 3: the same weights as 3 steps in one go."""
    import torch

    from atelier.world import train

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--smoke", "--threads", "1", "--stages", "clip"]
    train.main(common + ["--work", str(a), "--out", str(a / "out"), "--steps", "clip=3"])
    train.main(common + ["--work", str(b), "--out", str(b / "out"), "--steps", "clip=2"])
    train.main(common + ["--work", str(b), "--out", str(b / "out"), "--steps", "clip=3"])
    wa = torch.load(a / "clip.pt", weights_only=False)
    wb = torch.load(b / "clip.pt", weights_only=False)
    assert wa["step"] == wb["step"] == 3
    for k, v in wa["modules"]["model"].items():
        assert torch.allclose(v, wb["modules"]["model"][k], atol=1e-6), k


def test_shipped_tokenizer_is_trimmed_but_equivalent_on_world_prompts(smoke):
    """The exported tokenizer keeps ~800 of 49,408 tokens; world prompts map to the same original ids."""
    import torch
    from transformers import CLIPTokenizer

    from atelier.world import caption, sample_scene
    from atelier.world.diffusion import load_tokenizer, tokenize, trimmed_vocabulary, world_corpus

    _, _, old = trimmed_vocabulary(world_corpus())
    small = CLIPTokenizer.from_pretrained(smoke / "out" / "sd" / "tokenizer", model_max_length=32)
    full = load_tokenizer(smoke / "tok")
    assert 500 < len(small) < 2000
    rng = np.random.default_rng(9)
    texts = [caption(sample_scene(rng), t) for t in range(3) for _ in range(20)] + ["big yellow star, polka dots"]
    assert torch.equal(torch.tensor(old)[tokenize(small, texts, "cpu")], tokenize(full, texts, "cpu"))
    ids = tokenize(small, ["a red bicycle"], "cpu")[0]  # unknown words fall back to smaller pieces
    assert (ids < len(small)).all() and int((ids != len(small) - 1).sum()) > 4


def test_init_takes_clip_and_vae_as_exported_and_starts_the_unet_from_them(smoke, tmp_path):
    """``--init``: a run in a fresh work folder takes CLIP and VAE from an export unchanged (no training step)
    and starts its UNet from the exported UNet, not from a fresh initialisation."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from atelier.world import train

    init = tmp_path / "init"
    shutil.copytree(smoke / "out", init)
    unet = "sd/unet/diffusion_pytorch_model.safetensors"
    w = load_file(str(init / unet))
    w["conv_out.bias"] = torch.full_like(w["conv_out.bias"], 7.0)  # a mark no fresh initialisation has
    save_file(w, str(init / unet))
    assert train.main(["--smoke", "--init", str(init), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                       "--threads", "1", "--seed", "3", "--stages", "clip,vae,unet,export", "--steps", "unet=1"]) == 0
    rec = json.loads((tmp_path / "out" / "training.json").read_text())
    assert rec["clip"]["from"] == str(init) and rec["vae"]["from"] == str(init)
    assert rec["vae_decoder"]["from"] == str(init)  # the exported decoder is taken, not trained on again
    assert rec["unet"]["init"]["from"] == str(init) and rec["unet"]["step"] == 1
    for f in ("clip/open_clip_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (init / f).read_bytes(), f
    # one warmup step (learning rate ~1e-5) moves the mark by far less than 0.1
    bias = load_file(str(tmp_path / "out" / unet))["conv_out.bias"].float()
    assert torch.allclose(bias, torch.full_like(bias, 7.0), atol=0.1), bias


def test_the_decoder_stage_trains_the_decoder_and_leaves_the_encoder_as_it_was(smoke):
    """``vae_decoder`` must not move the latent space the UNet is trained on: the exported encoder is the
    ``vae`` stage's, the exported decoder is not."""
    import torch
    from safetensors.torch import load_file

    vae_stage = torch.load(smoke / "work" / "vae.pt", map_location="cpu", weights_only=False)["modules"]["vae"]
    exported = load_file(str(smoke / "out" / "sd" / "vae" / "diffusion_pytorch_model.safetensors"))
    for k, v in exported.items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(v, vae_stage[k].to(v.dtype)), k
    assert not all(torch.equal(v, vae_stage[k].to(v.dtype)) for k, v in exported.items() if k.startswith("decoder."))
