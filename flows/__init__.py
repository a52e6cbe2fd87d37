"""Prefect flows: compose the stages; pass ids, paths and keys, never live models or images."""

# The stages of a run, in order (``atelier run --force STAGE`` recomputes one and every later one).
STAGES = ("moodboard", "draft", "vary", "select", "refine", "inpaint", "face_restore", "upscale")
