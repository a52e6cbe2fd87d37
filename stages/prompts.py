"""Prompt weighting: A1111-style ``(word:1.3)`` emphasis for SD / SDXL, through compel.

A prompt without weights goes to the pipeline as text, unchanged. With weights, compel builds the
text-encoder embeddings with each fragment scaled (SDXL: both encoders, penultimate hidden states,
pooled output from the second), and the pipeline gets ``prompt_embeds`` instead of text. FLUX's T5
encoder has no such weighting: its prompts are passed as text.
"""

from __future__ import annotations

import re
from typing import Any

WEIGHTED = re.compile(r"\(([^()]+?):\s*([0-9]*\.?[0-9]+)\s*\)")  # (fragment:1.3)


def has_weights(text: str) -> bool:
    return bool(WEIGHTED.search(text or ""))


def to_compel(text: str) -> str:
    """A1111 ``(a red bike:1.3)`` → compel ``(a red bike)1.3``; everything else is left as written."""
    return WEIGHTED.sub(lambda m: f"({m[1]}){m[2]}", text)


def prompt_kwargs(pipe: Any, family: str, prompts: list[str], negatives: list[str] | None) -> dict:
    """Keyword arguments for a diffusers pipeline call: text, or compel embeddings when weights are used."""
    texts = list(prompts) + list(negatives or [])
    if family == "flux" or not any(has_weights(t) for t in texts):
        out = {"prompt": prompts}
        if negatives is not None:
            out["negative_prompt"] = negatives
        return out
    from compel import Compel, ReturnedEmbeddingsType

    if family == "sdxl":
        compel = Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2], text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                        requires_pooled=[False, True], truncate_long_prompts=False)
    else:
        compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False)
    negs = list(negatives) if negatives is not None else [""] * len(prompts)
    encoded = compel([to_compel(t) for t in list(prompts) + negs])
    embeds, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
    n = len(prompts)
    out = {"prompt_embeds": embeds[:n], "negative_prompt_embeds": embeds[n:]}
    if pooled is not None:
        out.update(pooled_prompt_embeds=pooled[:n], negative_pooled_prompt_embeds=pooled[n:])
    return out
