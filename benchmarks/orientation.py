"""How the orientation check (:func:`cxr.imaging.compute_orientation`) separates upright chest
films from the same films inverted (a negative) or turned by 90, 180 or 270 degrees.

    python -m benchmarks.orientation [--data ../shared/data/chest_xray_224] [--limit N] [--out FILE]

Prints one JSON object: for each transform, the score's quantiles and the share of films that
``check_is_radiograph`` would flag (score below ``MIN_ORIENTATION``). Upright films should almost
never be flagged; inverted and 90/270-degree films almost always (180 degrees is not detected)."""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from benchmarks.common import machine_info, resolve_data, write_json
from cxr.imaging import compute_orientation, load_image
from cxr.imaging.radiograph import MIN_ORIENTATION
from cxr.locate import image_files

TRANSFORMS = {
    "upright": lambda a: a,
    "inverted": lambda a: 255 - a,
    "rotated 90": lambda a: np.rot90(a, 1),
    "rotated 180": lambda a: np.rot90(a, 2),
    "rotated 270": lambda a: np.rot90(a, 3),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="image folder (default: the shared Kermany folder, else synthetic)")
    ap.add_argument("--limit", type=int, default=0, help="score at most N films (0: all)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    folder, _ = resolve_data(args.data)
    files = image_files(folder)
    if args.limit:
        files = files[:: max(1, len(files) // args.limit)][: args.limit]
    scores = {name: [] for name in TRANSFORMS}
    for path in files:
        grey = np.asarray(load_image(path, isolate=False).convert("L"))
        for name, fn in TRANSFORMS.items():
            scores[name].append(compute_orientation(np.ascontiguousarray(fn(grey))))
    result = {"films": len(files), "min_orientation": MIN_ORIENTATION, "machine": machine_info(), "transforms": {}}
    for name, values in scores.items():
        v = np.asarray(values)
        result["transforms"][name] = {
            "flagged": round(float((v < MIN_ORIENTATION).mean()), 4),
            "min": round(float(v.min()), 4), "q01": round(float(np.quantile(v, 0.01)), 4),
            "median": round(float(np.median(v)), 4), "q99": round(float(np.quantile(v, 0.99)), 4),
            "max": round(float(v.max()), 4)}
    print(json.dumps(result["transforms"], indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
