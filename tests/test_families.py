"""The GPU profiles' pipeline families (SDXL, FLUX) on tiny stand-ins of the same diffusers classes.

``tiny:sdxl`` / ``tiny:flux`` are StableDiffusionXLPipeline / FluxPipeline checkpoints built from small
configs (random weights), saved with ``save_pretrained`` and loaded back by ``atelier.models`` with
``from_pretrained(local_files_only=True)``: the load code, the ``from_pipe`` sharing, IP-Adapter and
LoRA handling and the stages' family rules are the ones the sdxl-* / flux-schnell profiles run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
from PIL import Image

from atelier import profiles, sources
from atelier.models import Models
from atelier.profiles import Lora, ModelSpec
from stages import draft, postedit, refine
from stages.protocol import Input
from tests.conftest import DEMO_REFS

REFS = tuple(Input(f"ref{i}", p) for i, p in enumerate(sorted(DEMO_REFS.glob("*.jpg"))))


@dataclass(frozen=True)
class Family:
    model: ModelSpec
    ip_adapter: ModelSpec
    scheduler: str
    guidance: float  # sdxl: CFG with a negative prompt; flux (schnell): ignored, no negative prompt
    pipeline_class: str
    denoiser: str  # the module from_pipe must share: "unet" | "transformer"


FAMILIES = {
    "sdxl": Family(
        ModelSpec("tiny-sdxl", "diffusers", "tiny:sdxl", family="sdxl"),
        ModelSpec("tiny-ip-adapter-sdxl", "ip-adapter", "tiny:ip-adapter-sdxl", subfolder="sdxl_models",
                  weight_name="ip-adapter_tiny_sdxl.safetensors"),
        "euler", 5.0, "StableDiffusionXLPipeline", "unet"),
    "flux": Family(
        ModelSpec("tiny-flux", "diffusers", "tiny:flux", family="flux"),
        ModelSpec("tiny-ip-adapter-flux", "ip-adapter", "tiny:ip-adapter-flux", weight_name="ip_adapter.safetensors"),
        "flow-euler", 0.0, "FluxPipeline", "transformer"),
}
W, H = 64, 48  # multiples of 16, as FLUX needs


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, int)


def _draft_req(fam: Family, seeds, batch_size=2, model: ModelSpec | None = None):
    return draft.DraftRequest(prompt="a red bicycle", negative="blurry", seeds=tuple(seeds),
                              indices=tuple(range(len(seeds))), width=W, height=H, steps=2, guidance=fam.guidance,
                              scheduler=fam.scheduler, model=model or fam.model, batch_size=batch_size)


@pytest.fixture(scope="module")
def inits(models_dir, tmp_path_factory) -> dict[str, tuple[Input, ...]]:
    """Two drafts per family (seeds 1, 2), saved as files: the refine / inpaint inputs."""
    folder = tmp_path_factory.mktemp("family-drafts")
    out = {}
    for name, fam in FAMILIES.items():
        req = _draft_req(fam, [1, 2])
        drafts = draft.generate_drafts(req, Models.at(models_dir))
        assert len(drafts) == len(req.seeds)
        paths = []
        for seed, d in zip(req.seeds, drafts):
            paths.append(Input(f"{name}-{seed}", folder / f"{name}-{seed}.png"))
            d.image.save(paths[-1].path)
        out[name] = tuple(paths)
    return out


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_checkpoint_reloads_as_the_real_pipeline_class(models_dir, name) -> None:
    fam = FAMILIES[name]
    folder = sources.resolve(fam.model, models_dir)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == fam.pipeline_class
    pipe = Models.at(models_dir).text2image(fam.model)  # from_pretrained(local_files_only=True)
    assert type(pipe).__name__ == fam.pipeline_class
    assert pipe.vae_scale_factor == 8  # the real VAEs' down-sampling, so size rules are the real ones
    if name == "sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    else:
        assert not pipe.transformer.config.guidance_embeds  # schnell-style
        assert pipe.vae.config.shift_factor and not pipe.vae.config.use_quant_conv
        # the offline T5 tokenizer came back from disk: T5's special ids, padding to max_sequence_length
        ids = pipe.tokenizer_2("a red bicycle", padding="max_length", max_length=512).input_ids
        assert type(pipe.tokenizer_2).__name__ == "T5Tokenizer" and pipe.tokenizer_2.pad_token_id == 0
        assert len(ids) == 512 and ids[3] == pipe.tokenizer_2.eos_token_id == 1 and 2 not in ids[:3]


# ----------------------------------------------------------------------------------------- drafts
@pytest.mark.parametrize("name", FAMILIES)
def test_drafts_have_the_size_and_are_seeded_per_image(models_dir, inits, name) -> None:
    fam = FAMILIES[name]
    a = [Image.open(p.path).convert("RGB") for p in inits[name]]  # seeds 1, 2 in one batch
    [b] = draft.generate_drafts(_draft_req(fam, [2], batch_size=1), Models.at(models_dir))
    assert all(im.size == (W, H) for im in a) and b.image.size == (W, H)
    assert np.abs(_px(a[1]) - _px(b.image)).max() <= 1  # seed 2 alone == seed 2 in a batch
    assert np.abs(_px(a[0]) - _px(a[1])).mean() > 1  # seeds differ


@pytest.mark.parametrize("profile", ["sdxl-turbo", "sdxl-lcm", "flux-schnell"])
def test_gpu_profile_draft_settings_run_on_the_stand_in(models_dir, profile) -> None:
    """The profile's draft spec and settings (scheduler, steps, guidance, LoRAs), with tiny weights."""
    p = profiles.get_profile(profile)
    model = replace(p.draft_model, source=f"tiny:{p.draft_model.family}", variant="",
                    loras=tuple(replace(lo, source="tiny:lora-sdxl") for lo in p.draft_model.loras))
    s = p.draft
    req = draft.DraftRequest(prompt="a red bicycle", negative="blurry", seeds=(1,), indices=(0,), width=W, height=H,
                             steps=s.steps, guidance=s.guidance, scheduler=s.scheduler, model=model, batch_size=1)
    [d] = draft.generate_drafts(req, Models.at(models_dir))
    assert d.image.size == (W, H)
    assert type(Models.at(models_dir).text2image(model).scheduler).__name__ == profiles.SCHEDULERS[s.scheduler]


def test_flux_sizes_must_be_multiples_of_16(models_dir) -> None:
    req = replace(_draft_req(FAMILIES["flux"], [1]), width=72)  # fine for SD (multiple of 8), not for FLUX
    with pytest.raises(ValueError, match="multiples of 16"):
        draft.generate_drafts(req, Models.at(models_dir))


# ----------------------------------------------------------------------------------------- refine
def _refine_req(fam: Family, inits, scale: float):
    return refine.RefineRequest(prompt="a red bicycle", negative="blurry", inits=inits[:1], seeds=(7,),
                                style_refs=REFS[:2], width=W, height=H, steps=3, guidance=fam.guidance,
                                strength=0.7, scheduler=fam.scheduler, ip_adapter_scale=scale, model=fam.model,
                                ip_adapter=fam.ip_adapter, batch_size=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_refine_shares_the_denoiser_and_ip_adapter_acts(models_dir, inits, name) -> None:
    fam = FAMILIES[name]
    models = Models.at(models_dir)
    [styled] = [o.image for o in refine.refine(_refine_req(fam, inits[name], scale=0.8), models)]
    [again] = [o.image for o in refine.refine(_refine_req(fam, inits[name], scale=0.8), models)]
    [plain] = [o.image for o in refine.refine(_refine_req(fam, inits[name], scale=0.0), models)]
    assert styled.size == (W, H)
    assert np.abs(_px(styled) - _px(again)).max() <= 1  # reproducible
    assert np.abs(_px(styled) - _px(plain)).mean() > 0.5  # the IP-Adapter conditions the denoiser
    base = models.text2image(fam.model)
    i2i = models.pipeline(fam.model, "img2img", fam.scheduler, ip_adapter=fam.ip_adapter)
    assert type(i2i).__name__ == fam.pipeline_class.replace("Pipeline", "Img2ImgPipeline")
    assert getattr(i2i, fam.denoiser) is getattr(base, fam.denoiser)  # from_pipe: one model in memory
    assert i2i.vae is base.vae and i2i.image_encoder is base.image_encoder is not None


# ---------------------------------------------------------------------------------------- inpaint
@pytest.mark.parametrize("name", FAMILIES)
def test_inpaint_changes_only_the_mask(models_dir, inits, name, tmp_path) -> None:
    fam = FAMILIES[name]
    src = tmp_path / "src.png"
    Image.open(REFS[0].path).convert("RGB").resize((70, 50)).save(src)  # not a multiple of 16
    postedit.region_mask((70, 50), (0.5, 0.0, 0.5, 0.5)).save(tmp_path / "mask.png")
    m = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    models = Models.at(models_dir)
    [out] = [o.image for o in postedit.inpaint(postedit.InpaintRequest(
        sources=(Input("src", src),), masks=(Input("mask", tmp_path / "mask.png"),), prompt="plain wall",
        negative="people", seeds=(3,), steps=3, guidance=fam.guidance, strength=1.0, scheduler=fam.scheduler,
        style_refs=REFS[:1], ip_adapter_scale=0.6, model=fam.model, ip_adapter=fam.ip_adapter, multiple=16), models)]
    a, b = _px(Image.open(src).convert("RGB")), _px(out)
    assert out.size == (70, 50)
    assert (a[~m] == b[~m]).all()  # outside the mask: the input, exactly
    assert np.abs(a[m] - b[m]).mean() > 5  # inside: repainted
    inp = models.pipeline(fam.model, "inpaint", fam.scheduler, ip_adapter=fam.ip_adapter)
    assert type(inp).__name__ == fam.pipeline_class.replace("Pipeline", "InpaintPipeline")
    assert getattr(inp, fam.denoiser) is getattr(models.text2image(fam.model), fam.denoiser)


def test_flux_inpaint_rejects_a_multiple_not_of_16(models_dir, tmp_path) -> None:
    fam = FAMILIES["flux"]
    # one source, one mask, one seed: everything else about the request is valid, only the multiple is not
    req = postedit.InpaintRequest(sources=(Input("s", tmp_path / "s.png"),), masks=(Input("m", tmp_path / "m.png"),),
                                  prompt="x", negative="", seeds=(1,), steps=2, guidance=0.0, strength=1.0,
                                  scheduler=fam.scheduler, style_refs=(), ip_adapter_scale=0.6, model=fam.model,
                                  ip_adapter=fam.ip_adapter, multiple=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        postedit.inpaint(req, Models.at(models_dir))


# ------------------------------------------------------------------------------------------- LoRA
def test_sdxl_lora_changes_output_and_scale_zero_restores_it(models_dir) -> None:
    fam = FAMILIES["sdxl"]

    def one(model: ModelSpec) -> np.ndarray:
        [d] = draft.generate_drafts(_draft_req(fam, [5], batch_size=1, model=model), Models.at(models_dir))
        return _px(d.image)

    plain = one(fam.model)
    styled = one(replace(fam.model, loras=(Lora("style", "tiny:lora-sdxl", scale=1.0),)))
    zero = one(replace(fam.model, loras=(Lora("style", "tiny:lora-sdxl", scale=0.0),)))
    assert np.abs(plain - styled).mean() > 1.0  # the LoRA acts on the shared SDXL UNet
    assert np.array_equal(zero, plain)  # adapter weight 0 == no LoRA
    assert np.array_equal(one(fam.model), plain)  # a spec without LoRAs disables it again
