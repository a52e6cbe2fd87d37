"""Prompt weighting `(word:1.3)` through compel, on the tiny SD and SDXL pipelines."""

from __future__ import annotations

import numpy as np

from atelier.models import Models
from atelier.profiles import ModelSpec
from stages import draft
from stages.prompts import has_weights, to_compel


def test_a1111_syntax_converts_to_compel() -> None:
    assert to_compel("a (red:1.3) bike, (sunlit brick wall:0.8)") == "a (red)1.3 bike, (sunlit brick wall)0.8"
    assert to_compel("no weights (just parentheses)") == "no weights (just parentheses)"
    assert has_weights("(x:1.2)") and not has_weights("plain (text)")


def _img(spec, models_dir, prompt, family_size=64):
    req = draft.DraftRequest(prompt=prompt, negative="", width=family_size, height=family_size, steps=2, guidance=1.0,
                             scheduler="lcm", model=spec, seeds=(5,), indices=(0,))
    return np.asarray(draft.generate_drafts(req, Models.at(models_dir))[0].image, int)


def test_weights_change_the_image_and_weight_one_does_not(models_dir, tiny_profile) -> None:
    spec = tiny_profile.draft_model
    plain = _img(spec, models_dir, "a red bicycle")
    neutral = _img(spec, models_dir, "a (red:1.0) bicycle")
    strong = _img(spec, models_dir, "a (red:1.8) bicycle")
    assert np.abs(plain - neutral).max() <= 2  # compel's unweighted embedding == the pipeline's own
    assert not np.array_equal(plain, strong)  # the emphasis reaches the image (tiny random UNet: weakly)
    assert np.array_equal(strong, _img(spec, models_dir, "a (red:1.8) bicycle"))
    # and it is exactly the token that got weighted: compare the embeddings compel produced
    from stages.prompts import prompt_kwargs

    pipe = Models.at(models_dir).pipeline(spec, "txt2img", "lcm")
    w = prompt_kwargs(pipe, "sd", ["a (red:1.8) bicycle", "a (red:1.0) bicycle"], None)["prompt_embeds"]
    per_token = (w[0] - w[1]).abs().mean(dim=-1)  # (77,)
    assert per_token[2] > 10 * per_token[5:].mean()  # token 2 = "red" (0 = start, 1 = "a")


def test_weights_on_sdxl(models_dir) -> None:
    spec = ModelSpec("tiny-sdxl", "diffusers", "tiny:sdxl", family="sdxl")
    plain = _img(spec, models_dir, "a red bicycle")
    strong = _img(spec, models_dir, "a (red:1.8) bicycle")
    assert plain.shape == strong.shape == (64, 64, 3)
    assert not np.array_equal(plain, strong)
