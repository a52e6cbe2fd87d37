"""Train the micro models on the micro world, from a seed, resumable; export them in ordinary formats.

    python -m atelier.world.train [--smoke] [--out DIR] [--work DIR] [--seed N] [--device auto|cpu|cuda]
                                  [--stages clip,vae,vae_decoder,unet,ip_adapter,export]

Stages run in order, one at a time; each one checkpoints into ``--work`` every few minutes and on
completion, so re-running the same command resumes where it stopped (a finished stage is skipped).
Every batch is a function of (seed, stage, step) only, so a resumed run sees the same data.

1. ``clip``: an open_clip CLIP (a small ModifiedResNet image tower, 64 px, + text transformer), symmetric
   InfoNCE on batches of scene pairs that differ in one attribute (hard negatives for position, shape,
   size, ...) plus an auxiliary per-attribute classification of both towers' embeddings (shared heads,
   training only);
2. ``vae``: an AutoencoderKL (f4, 4 latent channels), L1 + KL, on random crops;
   ``vae_decoder``: its decoder alone trained on, on whole images, with an L1 loss on image gradients
   too (sharper edges); the encoder is frozen, so the latents every later stage sees are unchanged;
3. ``unet``: a UNet2DConditionModel (epsilon, scaled-linear betas) conditioned on a transformers
   CLIPTextModel converted from the CLIP text tower (fine-tuned at a low learning rate), 10 % empty
   captions (classifier-free guidance), random aspect ratios;
4. ``ip_adapter``: decoupled cross-attention (to_k_ip / to_v_ip) + image projection + a small
   CLIPVisionModelWithProjection, trained with the UNet frozen to carry a reference's palette and style:
   the reference shares the target's background, object colour and style, the caption omits them;
5. ``export``: fp16 ``.safetensors`` into ``--out`` (CLIP: ``clip/``; diffusers pipeline: ``sd/``;
   IP-Adapter: ``ip-adapter/models/``) and ``training.json`` (steps, seconds, losses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from atelier.world import data
from atelier.world.models import CLIP_ARCH, FULL, SMOKE, Sizes, clip_config

STAGES = ("clip", "vae", "vae_decoder", "unet", "ip_adapter", "export")
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD (its default preprocess)
STD = (0.26862954, 0.26130258, 0.27577711)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class Run:
    """Shared state of one training run: sizes, paths, device, the training log."""

    def __init__(self, sizes: Sizes, out: Path, work: Path, seed: int, device: str):
        import torch

        self.s, self.out, self.work, self.seed, self.device = sizes, out, work, seed, device
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = work / "training.json"
        self.record = json.loads(self.log_file.read_text()) if self.log_file.exists() else {}
        self.torch = torch
        self.threads = torch.get_num_threads()
        self.adaptive_threads = False
        self.init: Path | None = None  # --init: exported models to start from (``seed_from_export``)

    def save_record(self) -> None:
        tmp = self.log_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2))
        os.replace(tmp, self.log_file)

    def total(self, stage: str) -> int:
        return getattr(self.s, f"{'ip' if stage == 'ip_adapter' else stage}_steps")

    def done(self, stage: str) -> bool:
        """Finished at (at least) the step count asked for now; a larger count resumes the stage."""
        rec = self.record.get(stage, {})
        return bool(rec.get("done")) and rec.get("step", 0) >= self.total(stage)

    def save_ckpt(self, stage: str, state: dict) -> None:
        path = self.work / f"{stage}.pt"
        tmp = path.with_suffix(".tmp")
        self.torch.save(state, tmp)
        os.replace(tmp, path)

    def has_ckpt(self, stage: str) -> bool:
        return (self.work / f"{stage}.pt").exists()

    def load_ckpt(self, stage: str) -> dict | None:
        return self.torch.load(self.work / f"{stage}.pt", map_location="cpu", weights_only=False) \
            if self.has_ckpt(stage) else None


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Warmup, then constant, then a linear decay over the last quarter ("WSD"). Until the decay starts
    the schedule does not depend on ``total``, so a run may be lengthened or shortened on resume and
    still be exactly the run a fresh start with the new total would make."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return base * (step + 1) / warmup
    decay_start = int(0.75 * total)
    if step < decay_start:
        return base
    return base * (1 - 0.95 * (step - decay_start) / max(1, total - decay_start))


class _ThreadGovernor:
    """Use every core when the machine is otherwise idle and one fewer when other processes are busy.

    Under ``nice`` on a shared 2-core box a 2-thread OpenMP step waits at every barrier for the thread
    that shares a core with someone else (we measured 3-4x slower steps); one thread then runs at
    nearly full speed. Decided every few steps from /proc/stat (CPU time of everyone else).
    """

    def __init__(self, torch: Any, max_threads: int):
        self.torch, self.max = torch, max_threads
        self.last = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                busy = sum(int(v) for i, v in enumerate(f.readline().split()[1:]) if i not in (3, 4))
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return busy, int(fields[11]) + int(fields[12]), time.time()
        except (OSError, IndexError, ValueError):
            return None

    def update(self) -> None:
        now = self._sample()
        if now is None or self.last is None or self.max < 2:
            return
        hz = os.sysconf("SC_CLK_TCK")
        others = ((now[0] - self.last[0]) - (now[1] - self.last[1])) / hz / max(1e-3, now[2] - self.last[2])
        self.last = now
        want = self.max if others < 0.35 else self.max - 1
        if want != self.torch.get_num_threads():
            self.torch.set_num_threads(want)


def _loop(run: Run, stage: str, total: int, modules: dict, opt: Any, step_fn: Any, lr: float, extra_state: Any=None) -> None:
    """Generic resumable loop: ``step_fn(step, rng) -> loss``; checkpoints every ``checkpoint_s``."""
    torch = run.torch
    ck = run.load_ckpt(stage)
    start, losses, seconds = 0, [], 0.0
    if ck:
        for k, m in modules.items():
            m.load_state_dict(ck["modules"][k])
        opt.load_state_dict(ck["opt"])
        start, losses, seconds = ck["step"], ck["losses"], ck["seconds"]
        log(f"{stage}: resumed at step {start}/{total}")
    rec = run.record.setdefault(stage, {})

    def checkpoint(step: Any):
        run.save_ckpt(stage, {"modules": {k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                              "step": step, "losses": losses, "seconds": seconds})
        rec.update(step=step, steps=total, seconds=round(seconds, 1),
                   loss_first_100=float(np.mean(losses[:100])) if losses else None,
                   loss_last_100=float(np.mean(losses[-100:])) if losses else None)
        run.save_record()

    last_ck = time.time()
    t0 = time.time()
    governor = _ThreadGovernor(torch, run.threads) if run.device == "cpu" and run.adaptive_threads else None
    for step in range(start, total):
        if governor and step % 5 == 0:
            governor.update()
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, g.get("base_lr", lr))
        loss = step_fn(step, data.step_rng(run.seed, stage, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        losses.append(loss.item())
        now = time.time()
        seconds += now - t0
        t0 = now
        if step % 50 == 0 or step == total - 1:
            log(f"{stage} step {step + 1}/{total} loss {np.mean(losses[-50:]):.4f} {seconds:.0f}s "
                f"({(step + 1 - start) / max(1e-9, seconds - (ck['seconds'] if ck else 0)):.2f} steps/s)")
        if run.s.checkpoint_s and now - last_ck > run.s.checkpoint_s:
            checkpoint(step + 1)
            last_ck = time.time()
            t0 = last_ck
    checkpoint(total)
    rec["done"] = True
    run.save_record()


# ----------------------------------------------------------------------------------------------- CLIP
def _clip_images(run: Run, images: np.ndarray, size: int):
    """uint8 (N, H, W, 3) -> normalised (N, 3, size, size): centre crop of the short side, resize to
    ``size`` (bicubic) — what open_clip's default preprocess does to a draft of any aspect."""
    torch = run.torch
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2: (h - s) // 2 + s, (w - s) // 2: (w - s) // 2 + s]
    if s != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(run.device)


def _register_clip_config(run: Run) -> Path:
    import open_clip

    cfg_dir = run.work / "clip-config"
    cfg_dir.mkdir(exist_ok=True)
    path = cfg_dir / f"{CLIP_ARCH}.json"
    path.write_text(json.dumps(clip_config(run.s), indent=2))
    open_clip.add_model_config(path)
    return path


def build_clip(run: Run) -> Any:
    import open_clip

    _register_clip_config(run)
    run.torch.manual_seed(run.seed)
    model = open_clip.create_model(CLIP_ARCH, pretrained=None)
    return model.to(run.device), open_clip.get_tokenizer(CLIP_ARCH)


# Weight of the auxiliary attribute loss beside InfoNCE (see ``attribute_heads``).
AUX_WEIGHT = 1.0


def attribute_heads(run: Run) -> Any:
    """One linear classifier per attribute over the *normalised* joint embedding, shared by both towers.

    Images are labelled from their scene, captions from ``scene.parse`` (attributes a caption leaves out
    are not labelled), so both towers must encode every attribute, along the same directions. With
    InfoNCE alone the first round's text tower mapped "on the left" / "on the right" to the same
    embedding (cosine 1.000), since its image tower could not see position. These heads alone did not
    fix that (a ViT image tower stayed at chance on position with them: the real cause was the ViT, see
    ``models.Sizes``); with the ResNet tower they make the labels explicit. No ablation without them was
    run. Training-only: the export is a plain open_clip model.
    """
    from atelier.world.scene import ATTRIBUTES, VOCAB

    torch = run.torch
    torch.manual_seed(run.seed + 10)
    return torch.nn.ModuleDict({a: torch.nn.Linear(run.s.clip_embed, len(VOCAB[a])) for a in ATTRIBUTES}).to(run.device)


def _attribute_loss(run: Run, heads: Any, emb: Any, labels: list[dict]) -> Any:
    from atelier.world.scene import ATTRIBUTES, VOCAB

    torch = run.torch
    emb = torch.nn.functional.normalize(emb, dim=-1) * 8.0  # unit vectors; fixed temperature for the heads
    total = 0.0
    for a in ATTRIBUTES:
        y = torch.tensor([VOCAB[a].index(lb[a]) if lb.get(a) is not None else -100 for lb in labels],
                         device=run.device)
        total = total + torch.nn.functional.cross_entropy(heads[a](emb), y, ignore_index=-100)
    return total / len(ATTRIBUTES)


def train_clip(run: Run) -> None:
    from atelier.world.scene import parse

    torch = run.torch
    s = run.s
    model, tokenizer = build_clip(run)
    model.train()
    heads = attribute_heads(run).train()
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=s.clip_lr, weight_decay=0.05,
                            betas=(0.9, 0.98))

    def step_fn(step: Any, rng: Any):
        aspect = data.ASPECTS[int(rng.integers(len(data.ASPECTS)))]
        short = s.clip_image if rng.random() < 0.7 else int(rng.choice([s.clip_image * 5 // 8, s.clip_image * 3 // 4]))
        w, h = data.size_for(aspect, short)
        images, captions, scenes = data.pair_batch(s.clip_pairs, rng, w, h)
        x = _clip_images(run, images, s.clip_image)
        t = tokenizer(captions).to(run.device)
        img, txt, scale = model(x, t)[:3]
        logits = scale * img @ txt.T
        # captions can repeat inside a batch (same attributes): treat every equal caption as a positive
        same = torch.tensor([[a == b for b in captions] for a in captions], device=run.device, dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        contrastive = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                             + torch.nn.functional.cross_entropy(logits.T, target))
        aux = 0.5 * (_attribute_loss(run, heads, img, [sc.attributes() for sc in scenes])
                     + _attribute_loss(run, heads, txt, [parse(c) for c in captions]))
        return contrastive + AUX_WEIGHT * aux

    _loop(run, "clip", s.clip_steps, {"model": model, "heads": heads}, opt, step_fn, s.clip_lr)


def load_trained_clip(run: Run) -> Any:
    model, tokenizer = build_clip(run)
    ck = run.load_ckpt("clip")
    model.load_state_dict(ck["modules"]["model"])
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------- VAE
def _pixels(run: Run, images: np.ndarray):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    x = run.torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x.to(run.device)


def train_vae(run: Run) -> None:
    from atelier.world.diffusion import build_vae

    torch = run.torch
    s = run.s
    run.torch.manual_seed(run.seed + 1)
    vae = build_vae(s)
    with torch.no_grad():  # start near-deterministic: log-variance -6 (std 0.05), not 0 (std 1, pure noise)
        vae.encoder.conv_out.bias[vae.config.latent_channels:] -= 6.0
    vae = vae.to(run.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)

    def step_fn(step: Any, rng: Any):
        aspect = data.ASPECTS[int(rng.integers(len(data.ASPECTS)))]
        w, h = data.size_for(aspect, s.vae_image, 16)
        n = s.vae_batch
        images, _, _ = data.scene_batch(n, rng, w, h)
        c = s.vae_crop  # the autoencoder is fully convolutional: random crops train it 4x cheaper per image
        crops = []
        for im in images:
            y0, x0 = int(rng.integers(0, im.shape[0] - c + 1)), int(rng.integers(0, im.shape[1] - c + 1))
            crops.append(im[y0:y0 + c, x0:x0 + c])
        x = _pixels(run, np.stack(crops))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        return (rec - x).abs().mean() + 0.5 * ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()

    _loop(run, "vae", s.vae_steps, {"vae": vae}, opt, step_fn, s.vae_lr)


def load_trained_vae(run: Run) -> Any:
    """The trained VAE with ``scaling_factor`` = 1 / std of its latents (measured once, recorded)."""
    from atelier.world.diffusion import build_vae

    torch = run.torch
    vae = build_vae(run.s)
    vae.load_state_dict(run.load_ckpt("vae")["modules"]["vae"])
    vae = vae.to(run.device).eval().requires_grad_(False)
    rec = run.record.setdefault("vae", {})
    if "scaling_factor" not in rec:
        x = _held_out_pixels(run)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
            rec["psnr_db"] = _psnr(vae.decode(z).sample, x)
        rec["scaling_factor"] = float(1 / z.std())
        run.save_record()
    vae.register_to_config(scaling_factor=rec["scaling_factor"])
    if run.done("vae_decoder"):
        ck = run.load_ckpt("vae_decoder")["modules"]
        vae.decoder.load_state_dict(ck["decoder"])
        vae.post_quant_conv.load_state_dict(ck["post_quant_conv"])
    return vae


def _held_out_pixels(run: Run):
    """64 renders no training batch holds (the VAE's scale and PSNR are measured on them)."""
    images, _, _ = data.scene_batch(64, data.step_rng(run.seed, "vae-scale", 0), run.s.vae_image, run.s.vae_image)
    return _pixels(run, images)


def _psnr(y: Any, x: Any) -> float:
    """PSNR (dB) of ``y`` (clamped to [-1, 1]) against ``x``, both in [-1, 1]."""
    mse = ((y.clamp(-1, 1) - x) ** 2).mean()
    return float(10 * (4 / mse).log10())


def _vae_psnr(run: Run, vae: Any) -> float:
    """Round-trip PSNR (dB) through the posterior mean, on the held-out renders."""
    x = _held_out_pixels(run)
    with run.torch.no_grad():
        return _psnr(vae.decode(vae.encode(x).latent_dist.mean).sample, x)


def train_vae_decoder(run: Run) -> None:
    """The decoder (and ``post_quant_conv``) trained on with the encoder frozen: 800 steps of crops leave
    soft edges (~20 dB), and a sharper decoder raises what any UNet can show without touching the latent
    space, so a UNet trained on the encoder's latents needs no retraining."""
    torch = run.torch
    s = run.s
    vae = load_trained_vae(run)
    before = _vae_psnr(run, vae)
    parts = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}
    for m in parts.values():
        m.requires_grad_(True).train()
    opt = torch.optim.AdamW([p for m in parts.values() for p in m.parameters()], lr=s.vae_decoder_lr,
                            weight_decay=0.0)

    def grads(x: Any):
        return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

    def step_fn(step: Any, rng: Any):
        aspect = data.ASPECTS[int(rng.integers(len(data.ASPECTS)))]
        w, h = data.size_for(aspect, s.vae_image, 16)
        images, _, _ = data.scene_batch(s.vae_decoder_batch, rng, w, h)
        x = _pixels(run, images)
        with torch.no_grad():  # the UNet's training latents are samples of this posterior
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        (ry, rx), (ty, tx) = grads(rec), grads(x)
        edge = (ry - ty).abs().mean() + (rx - tx).abs().mean()
        return (rec - x).abs().mean() + 0.5 * ((rec - x) ** 2).mean() + s.vae_decoder_edge * edge

    _loop(run, "vae_decoder", s.vae_decoder_steps, parts, opt, step_fn, s.vae_decoder_lr)
    for m in parts.values():
        m.eval().requires_grad_(False)
    rec = run.record["vae_decoder"]
    rec.update(psnr_db_before=round(before, 2), psnr_db=round(_vae_psnr(run, vae), 2))
    run.save_record()
    log(f"vae_decoder: round-trip PSNR {before:.2f} -> {rec['psnr_db']:.2f} dB")


# ----------------------------------------------------------------------------------------------- UNet
OFFSET_NOISE = 0.1  # flat colour fields need the mean colour of the latent to be learnable
MIN_SNR_GAMMA = 5.0


def _noise_scheduler():
    from diffusers import DDPMScheduler

    from atelier.world.diffusion import BETAS

    return DDPMScheduler(**BETAS, prediction_type="epsilon")


def _diffusion_loss(run: Run, unet: Any, sched: Any, latents: Any, cond: Any, rng: Any, added_cond_kwargs: Any=None):
    torch = run.torch
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
    noise = torch.randn(latents.shape, generator=g)
    noise = noise + OFFSET_NOISE * torch.randn(latents.shape[:2] + (1, 1), generator=g)
    noise = noise.to(run.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g).to(run.device)
    noisy = sched.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond, added_cond_kwargs=added_cond_kwargs).sample
    ac = sched.alphas_cumprod.to(run.device)[t]
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
    return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def _unet_batch(run: Run, rng: Any, batch: int, short: int):
    """Images at a random aspect (and, one step in five, at twice the short side with a quarter batch)."""
    aspect = data.ASPECTS[int(rng.integers(len(data.ASPECTS)))]
    if rng.random() < 0.2:
        short, batch = short * 2, max(1, batch // 4)
    w, h = data.size_for(aspect, short, 16)
    n = max(1, round(batch * short ** 2 / (w * h)))
    return data.scene_batch(n, rng, w, h)


def _text_encoder_from_clip(run: Run):
    from atelier.world.diffusion import clip_text_to_hf

    clip, _ = load_trained_clip(run)
    return clip_text_to_hf(clip.cpu(), run.s).to(run.device)


def train_unet(run: Run) -> None:
    from atelier.world.diffusion import build_unet, load_tokenizer, tokenize

    torch = run.torch
    s = run.s
    vae = load_trained_vae(run)
    sf = vae.config.scaling_factor
    text_encoder = _text_encoder_from_clip(run).train()
    text_encoder.get_input_embeddings().requires_grad_(False)  # only ~30 of its 49,408 rows are ever used
    tokenizer = load_tokenizer(run.work / "tokenizer")
    torch.manual_seed(run.seed + 2)
    unet = build_unet(s, s.clip_width)
    if run.init is not None and not run.has_ckpt("unet"):
        _unet_from_export(run, unet, text_encoder)
    unet = unet.to(run.device).train()
    sched = _noise_scheduler()
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "base_lr": s.unet_lr},
        {"params": [p for p in text_encoder.parameters() if p.requires_grad], "base_lr": s.text_lr},
    ], lr=s.unet_lr, weight_decay=0.0)

    def step_fn(step: Any, rng: Any):
        images, captions, _ = _unet_batch(run, rng, s.unet_batch, s.unet_image)
        captions = ["" if rng.random() < 0.1 else c for c in captions]  # classifier-free guidance
        with torch.no_grad():
            latents = vae.encode(_pixels(run, images)).latent_dist.sample() * sf
        cond = text_encoder(tokenize(tokenizer, captions, run.device))[0]
        return _diffusion_loss(run, unet, sched, latents, cond, rng)

    _loop(run, "unet", s.unet_steps, {"unet": unet, "text_encoder": text_encoder}, opt, step_fn, s.unet_lr)


def _unet_from_export(run: Run, unet: Any, text_encoder: Any) -> None:
    """Start the UNet stage from an exported pipeline (``--init``): its UNet and text encoder weights
    (fp16 files, upcast), except the text encoder's trimmed token table (frozen; the CLIP's is kept)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch = run.torch
    sd = run.init / "sd"
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(sd, subfolder="unet", torch_dtype=torch.float32).state_dict())
    te = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", torch_dtype=torch.float32).state_dict()
    te = {k: v for k, v in te.items() if "token_embedding" not in k}
    missing, unexpected = text_encoder.load_state_dict(te, strict=False)
    if unexpected or [k for k in missing if "token_embedding" not in k]:
        raise RuntimeError(f"{sd}: text encoder does not match ({missing}, {unexpected})")
    prev = json.loads((run.init / "training.json").read_text()).get("unet", {})
    run.record.setdefault("unet", {})["init"] = {"from": str(run.init), "steps": prev.get("steps"),
                                                 "seconds": prev.get("seconds")}
    run.save_record()
    log(f"unet: starting from {sd} ({prev.get('steps')} steps)")


def seed_from_export(run: Run, folder: Path) -> None:
    """``--init``: a stage without a checkpoint is taken from exported models instead of trained again:
    ``clip`` and ``vae`` as they are (their training record is copied), ``unet`` as the starting point
    of its steps. fp16 files: the weights equal a fresh run's up to fp16 rounding."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from atelier.world.diffusion import build_vae

    torch = run.torch
    run.init = Path(folder)
    prev = json.loads((run.init / "training.json").read_text())
    if not run.has_ckpt("clip"):
        model, _ = build_clip(run)
        state = {k: v.float() for k, v in load_file(str(run.init / "clip" / CLIP_WEIGHT_NAME)).items()}
        model.load_state_dict(state)
        run.save_ckpt("clip", {"modules": {"model": model.state_dict()}, "step": prev["clip"]["step"]})
        run.record["clip"] = {**prev["clip"], "from": str(run.init)}
        log(f"clip: taken from {run.init / 'clip'}")
    if not run.has_ckpt("vae"):
        vae = build_vae(run.s)
        vae.load_state_dict(AutoencoderKL.from_pretrained(run.init / "sd", subfolder="vae",
                                                          torch_dtype=torch.float32).state_dict())
        run.save_ckpt("vae", {"modules": {"vae": vae.state_dict()}, "step": prev["vae"]["step"]})
        run.record["vae"] = {**prev["vae"], "from": str(run.init)}
        log(f"vae: taken from {run.init / 'sd' / 'vae'}")
        if prev.get("vae_decoder", {}).get("done") and not run.has_ckpt("vae_decoder"):  # the export's decoder
            run.save_ckpt("vae_decoder", {"modules": {"decoder": vae.decoder.state_dict(),
                                                      "post_quant_conv": vae.post_quant_conv.state_dict()},
                                          "step": prev["vae_decoder"]["step"]})
            run.record["vae_decoder"] = {**prev["vae_decoder"], "from": str(run.init)}
    run.save_record()


def load_trained_unet(run: Run) -> Any:
    from transformers import CLIPTextModel

    from atelier.world.diffusion import build_unet, text_config

    ck = run.load_ckpt("unet")["modules"]
    unet = build_unet(run.s, run.s.clip_width)
    unet.load_state_dict(ck["unet"])
    te = CLIPTextModel(text_config(run.s))
    te.load_state_dict(ck["text_encoder"], strict=False)
    return unet.to(run.device).eval(), te.to(run.device).eval()


# ----------------------------------------------------------------------------------------------- IP-Adapter
def _reference_for(scene: Any, rng: Any):
    """A different scene with the same palette (background and object colour) and style."""
    from dataclasses import replace

    from atelier.world.scene import POSITIONS, SHAPES, SIZES

    return replace(scene, shape=str(rng.choice(SHAPES)), position=str(rng.choice(POSITIONS)),
                   size=str(rng.choice(SIZES)))


def _ip_images(run: Run, images: np.ndarray):
    """CLIPImageProcessor's normalisation (OpenAI mean / std) for square renders at the encoder's size."""
    torch = run.torch
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(run.device)


def build_ip_modules(run: Run, unet: Any) -> Any:
    from atelier.world.diffusion import build_image_encoder, ip_adapter_init_state

    run.torch.manual_seed(run.seed + 3)
    encoder = build_image_encoder(run.s).to(run.device)
    unet._load_ip_adapter_weights([ip_adapter_init_state(unet, run.s.ip_width, run.s.ip_tokens)])
    unet.to(run.device)
    return encoder


def train_ip_adapter(run: Run) -> None:
    from atelier.world.diffusion import ip_adapter_parameters, load_tokenizer, tokenize
    from atelier.world.render import render_array
    from atelier.world.scene import caption

    torch = run.torch
    s = run.s
    vae = load_trained_vae(run)
    sf = vae.config.scaling_factor
    unet, text_encoder = load_trained_unet(run)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    encoder = build_ip_modules(run, unet).train()
    adapter = ip_adapter_parameters(unet)
    for p in adapter:
        p.requires_grad_(True)
    tokenizer = load_tokenizer(run.work / "tokenizer")
    sched = _noise_scheduler()
    opt = torch.optim.AdamW(list(encoder.parameters()) + adapter, lr=s.ip_lr, weight_decay=0.0)

    class Adapter(torch.nn.Module):  # one module to checkpoint: projection + per-layer k/v
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterList(adapter)

    holder = Adapter()

    def step_fn(step: Any, rng: Any):
        images, _, scenes = data.scene_batch(s.ip_batch, rng, s.unet_image, s.unet_image)
        refs = np.stack([render_array(_reference_for(sc, rng), s.ip_image, s.ip_image, int(rng.integers(0, 2**31)))
                         for sc in scenes])
        captions = []
        for sc in scenes:
            r = rng.random()
            drop = ("background", "colour", "style") if r < 0.6 else (() if r < 0.8 else ("background", "style"))
            captions.append(caption(sc, drop=drop))
        with torch.no_grad():
            latents = vae.encode(_pixels(run, images)).latent_dist.sample() * sf
            cond = text_encoder(tokenize(tokenizer, captions, run.device))[0]
        emb = encoder(_ip_images(run, refs)).image_embeds
        keep = torch.from_numpy((rng.random(len(scenes)) > 0.1).astype(np.float32)).to(run.device)[:, None]
        emb = emb * keep  # 10 % zero embeddings: what the pipeline feeds the unconditional branch
        return _diffusion_loss(run, unet, sched, latents, cond, rng, {"image_embeds": [emb[:, None, :]]})

    _loop(run, "ip_adapter", s.ip_steps, {"encoder": encoder, "adapter": holder}, opt, step_fn, s.ip_lr)


# ----------------------------------------------------------------------------------------------- export
from atelier.world.loading import CLIP_WEIGHT_NAME, IP_SUBFOLDER, IP_WEIGHT_NAME  # noqa: E402


def export(run: Run) -> None:
    """fp16 safetensors in ordinary layouts, written atomically per model folder."""
    import shutil

    from safetensors.torch import save_file

    from atelier.world.diffusion import ip_adapter_state, save_pipeline

    torch = run.torch
    out = run.out
    out.mkdir(parents=True, exist_ok=True)

    def replace_dir(name: Any, build: Any):
        tmp = out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)
        log(f"export: {out / name}")

    if run.done("clip"):
        def clip_dir(tmp: Any):
            model, _ = load_trained_clip(run)
            (tmp / f"{CLIP_ARCH}.json").write_text(json.dumps(clip_config(run.s), indent=2))
            save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()},
                      str(tmp / CLIP_WEIGHT_NAME))
        replace_dir("clip", clip_dir)
    if run.done("vae") and run.done("unet"):
        vae = load_trained_vae(run)
        unet, te = load_trained_unet(run)
        replace_dir("sd", lambda tmp: save_pipeline(tmp, vae, te, unet, run.s))
        if run.done("ip_adapter"):
            def ip_dir(tmp: Any):
                encoder = build_ip_modules(run, unet)
                ck = run.load_ckpt("ip_adapter")["modules"]
                encoder.load_state_dict(ck["encoder"])
                from atelier.world.diffusion import ip_adapter_parameters

                with torch.no_grad():
                    for p, v in zip(ip_adapter_parameters(unet), ck["adapter"].values()):
                        p.copy_(v)
                (tmp / IP_SUBFOLDER).mkdir()
                encoder.to("cpu", torch.float16).save_pretrained(tmp / IP_SUBFOLDER / "image_encoder",
                                                                 safe_serialization=True)
                save_file({k: v.to("cpu", torch.float16) for k, v in ip_adapter_state(unet).items()},
                          str(tmp / IP_SUBFOLDER / IP_WEIGHT_NAME))
            replace_dir("ip-adapter", ip_dir)
    rec = {k: v for k, v in run.record.items()}
    (out / "training.json").write_text(json.dumps(rec, indent=2))


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atelier.world.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every stage tiny, in seconds (tests)")
    p.add_argument("--out", type=Path, default=None, help="where the exported models go (default models/micro)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints (default .atelier/world-train/seed<N>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--share-cpu", action="store_true", help="drop to one thread fewer while other processes "
                   "are busy (for a shared machine under nice; results are the same up to float rounding)")
    p.add_argument("--steps", default="", help="override step counts, e.g. clip=1200,unet=2500 (a resumed run "
                   "may change them until its stage's decay phase starts)")
    p.add_argument("--init", type=Path, default=None, help="start from exported models (e.g. models/micro): "
                   "clip and vae without a checkpoint are taken as they are, unet starts from their weights")
    a = p.parse_args(argv)
    stages = [x for x in a.stages.split(",") if x]
    unknown = [x for x in stages if x not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    sizes = SMOKE if a.smoke else FULL
    if a.steps:
        from dataclasses import replace

        pairs = (x.split("=") for x in a.steps.split(","))
        sizes = replace(sizes, **{f"{k.strip().replace('ip_adapter', 'ip')}_steps": int(v) for k, v in pairs})
    out = a.out or Path("models/micro")
    work = a.work or Path(".atelier/world-train") / f"seed{a.seed}{'-smoke' if a.smoke else ''}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from atelier import compat

    compat.apply()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    run = Run(sizes, out, work, a.seed, device)
    run.adaptive_threads = a.share_cpu
    if a.init:
        seed_from_export(run, a.init)
    run.record.setdefault("meta", {}).update(seed=a.seed, sizes=sizes.name, device=device, torch=torch.__version__,
                                             threads=torch.get_num_threads())
    fns = {"clip": train_clip, "vae": train_vae, "vae_decoder": train_vae_decoder, "unet": train_unet,
           "ip_adapter": train_ip_adapter, "export": export}
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage != "export" and run.done(stage):
            log(f"{stage}: done already (checkpoint in {work})")
            continue
        log(f"{stage}: start ({sizes.name}, {device}, seed {a.seed})")
        fns[stage](run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
