"""5. Upscale 1024x576 -> 3840x2160 (tiled), compact and x4plus: seconds and peak memory (RSS).

Each model runs in its own subprocess so peak RSS is per model.
Usage: python bench/upscale.py [--models realesr-animevideov3-x4 realesrgan-x4plus] [--tile 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import write

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
from atelier import compat; compat.apply()
from PIL import Image
from atelier.profiles import ModelSpec
from atelier.sources import resolve
from stages import postedit
from skimage import data
from bench.common import peak_rss_mib
name, arch, tile = sys.argv[1], sys.argv[2], int(sys.argv[3])
tmp = Path(tempfile.mkdtemp())
src = tmp / "src.png"
Image.fromarray(data.astronaut()).resize((1024, 576), Image.Resampling.LANCZOS).save(src)
spec = ModelSpec(name, "realesrgan", "ncnn:" + name, arch=arch, weight_name=name + ".pth")
resolve(spec, tmp / "models")
before = peak_rss_mib()
t0 = time.perf_counter()
[out] = postedit.upscale(postedit.UpscaleRequest((src,), (3840, 2160), spec, tmp / "models", tile=tile))
seconds = time.perf_counter() - t0
print(json.dumps({"model": name, "tile": tile, "seconds": seconds, "size": out.size,
                  "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["realesr-animevideov3-x4", "realesrgan-x4plus"])
    ap.add_argument("--tile", type=int, default=256)
    args = ap.parse_args()
    arch = {"realesrgan-x4plus": "rrdb", "realesrgan-x4plus-anime": "rrdb"}
    rows = []
    for name in args.models:
        res = subprocess.run([sys.executable, "-c", CHILD, name, arch.get(name, "srvgg"), str(args.tile)],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if res.returncode != 0:
            raise SystemExit(res.stderr)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    table = [("model", "tile", "seconds", "peak RSS (MiB)", "output")]
    table += [(r["model"], r["tile"], f"{r['seconds']:.1f}", f"{r['peak_rss_mib']:.0f}", "x".join(map(str, r["size"])))
              for r in rows]
    print(write("upscale", {"runs": rows}, table))


if __name__ == "__main__":
    main()
