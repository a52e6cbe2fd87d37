"""1 + 4. Draft images/s: atelier's draft stage vs a bare diffusers loop (interleaved A B A B), and batching.

Both sides use the same pipeline object, dtype, batch size, steps, seeds (one generator per image).
"A" is ``stages.draft.generate_drafts`` (model cache lookup, scheduler check, batching, dataclasses);
"A+store" additionally PNG-encodes and commits every image through ``store.save`` (what a run does).
"B" is the loop a user would write by hand.
Usage: python bench/draft_efficiency.py [--rounds 4] [--images 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import Timer, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--profile", default="tiny")
    args = ap.parse_args()

    from atelier import compat

    compat.apply()
    import torch

    from atelier.keys import asset_key
    from atelier.models import Models, device
    from atelier.profiles import get_profile
    from stages import draft
    from stages.common import png_bytes
    from store import NewAsset, lineage, open_store, save

    prof = get_profile(args.profile)
    home = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    models = Models.at(home / "models")
    w, h, steps, guidance = 64, 64, prof.draft.steps, prof.draft.guidance
    seeds = tuple(range(args.images))
    dev = device()
    store = open_store(home)
    lineage.start_run(store, "bench", "bench", "-", "0" * 64, prof.name, {})

    def atelier_stage(batch: int):
        return draft.generate_drafts(draft.DraftRequest(
            "a red bicycle", "blurry", w, h, steps, guidance, prof.draft.scheduler, model=prof.draft_model,
            seeds=seeds, indices=tuple(range(len(seeds))), batch_size=batch), models)

    counter = iter(range(10**9))

    def atelier_with_store(batch: int):
        drafts = atelier_stage(batch)
        n = next(counter)
        save(store, "bench", [NewAsset(key=asset_key("draft", 1, {"seed": seed, "n": n}, [], None), stage="draft",
                                       kind="image", campaign="bench", deliverable="d", data=png_bytes(d.image),
                                       suffix=".png", params={"seed": seed}) for seed, d in zip(seeds, drafts)])

    pipe = models.pipeline(prof.draft_model, "txt2img", prof.draft.scheduler)

    def bare(batch: int):
        out = []
        for i in range(0, len(seeds), batch):
            chunk = seeds[i : i + batch]
            gens = [torch.Generator(device=dev).manual_seed(s) for s in chunk]
            out += pipe(["a red bicycle"] * len(chunk), negative_prompt=["blurry"] * len(chunk), width=w, height=h,
                        num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        return out

    sides = {"atelier stage": atelier_stage, "atelier stage + store": atelier_with_store, "bare diffusers": bare}
    for fn in sides.values():  # warm-up: loads, allocator, first-call overheads
        fn(4)
    times: dict[str, list[float]] = {k: [] for k in sides}
    batch = min(4, args.images)
    for _ in range(args.rounds):  # interleaved: A B C A B C ...
        for name, fn in sides.items():
            with Timer() as t:
                fn(batch)
            times[name].append(t.seconds)
    ips = {k: args.images / statistics.median(v) for k, v in times.items()}  # median: robust to load spikes
    ratio = ips["atelier stage"] / ips["bare diffusers"]
    ratio_store = ips["atelier stage + store"] / ips["bare diffusers"]

    batching = {}
    for b in (1, 8):
        with Timer() as t:
            bare(b)
        batching[b] = args.images / t.seconds
    table = [("measure", "value", "goal")]
    table += [(f"images/s, {k} (batch {batch})", f"{v:.2f}", "") for k, v in ips.items()]
    table += [("atelier / bare", f"{ratio:.3f}", ">= 0.85 CPU tiny, >= 0.95 GPU"),
              ("atelier + store / bare", f"{ratio_store:.3f}", ""),
              ("batch 8 / batch 1 images/s", f"{batching[8] / batching[1]:.2f}", ">= 1.4 on GPU")]
    print(write("draft_efficiency", {"profile": prof.name, "images": args.images, "rounds": args.rounds,
                                     "size": [w, h], "steps": steps, "times": times, "images_per_s": ips,
                                     "ratio": ratio, "ratio_with_store": ratio_store,
                                     "batching_images_per_s": batching}, table))


if __name__ == "__main__":
    main()
