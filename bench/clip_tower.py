"""A cheaper CLIP tower, measured (issue 30, item 3): each candidate of
models/clip_fast.py side by side with the float tower, in one run, on the same aligned
face crops (``../shared/data/images`` through RetinaFace and pipeline/crop.py).

For each candidate: ms per crop at 1 and 2 torch threads, one crop at a time as the
audit embeds them, timed in alternation with the float tower (float, candidate,
candidate, float, ...: the machine is shared), as wall time and as process CPU time,
reported as medians and the median of the paired ratios; cosine to the float tower of
the CLS token after every block 1..12 (the shipped probe reads all twelve), raw and as
the probe reads it (standardised), min and mean over crops, and of the probe's whole
input; crops from ``--images`` plus generated ones (the demo's face photos, their
face swaps and mirror images); batch independence (a crop alone vs in a batch of 8) and thread
independence (1 vs 2 threads), each as "identical to the bit" plus the largest absolute
difference. One JSON line per candidate (and one
for the float tower itself) is appended to ``bench/results/clip_tower.jsonl``.

    python bench/clip_tower.py
    python bench/clip_tower.py --candidates int8x2,int8mix --timing-crops 12
    python bench/clip_tower.py --emulate-avx2   # fbgemm/MKL/oneDNN on AVX2 code paths

``--emulate-avx2`` re-runs the bench with the kernels' AVX2 code paths forced
(``FBGEMM_ENABLE_INSTRUCTIONS``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``): on a CPU with AVX-512 VNNI it is what an AVX2-only CPU runs,
the kernels that saturate u8 x s8 pair sums. Candidates' fidelity there is the check
that the int8 ones do not saturate; its timings approximate an AVX2-only machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

BLOCKS = tuple(range(1, 13))  # the shipped probe reads the CLS token after every block
AVX2_ENV = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
DEFAULT = "int8x2,int8mix,int8,px192,px160,tome8,int8_px192,int8_tome8"
RESULTS = Path(__file__).parent / "results" / "clip_tower.jsonl"


def face_crops(root: Path, n: int, size: int = 224) -> tuple[np.ndarray, list[str]]:
    """``n`` aligned crops of the most prominent face, from images spread evenly over
    ``root`` (sorted paths; images without a face are skipped)."""
    import cv2

    from deepaudit.models.face_detector import RetinaFaceDetector
    from deepaudit.pipeline.crop import align_crop, select_face

    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(f"no images under {root}: pass --images")
    det = RetinaFaceDetector()
    stride = max(1, len(paths) // n)  # every stride-th image first, then the others
    order = paths[::stride] + [p for i, p in enumerate(paths) if i % stride]
    crops, names = [], []
    for path in order:
        bgr = cv2.imread(str(path))
        if bgr is None:
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        faces = det.detect(rgb)[0]
        i = select_face(faces)
        if i is None:
            continue
        crops.append(align_crop(rgb, faces[i], size))
        names.append(str(path.relative_to(root)))
        if len(crops) == n:
            break
    return np.stack(crops), names


def generated_crops(size: int = 224) -> tuple[np.ndarray, list[str]]:
    """Aligned crops of the demo's face photos, of its face swaps (pipeline/demo_media.py)
    and of their mirror images: faces no training set holds."""
    from deepaudit.models.face_detector import RetinaFaceDetector
    from deepaudit.pipeline.crop import align_crop, select_face
    from deepaudit.pipeline.demo_media import FAKE_PAIRS, blend_face, face_photos

    photos = face_photos()
    named = dict(photos)
    for target, source in FAKE_PAIRS:
        named[f"swap:{source}->{target}"] = blend_face(photos[target], photos[source])
    det, crops, names = RetinaFaceDetector(), [], []
    for name, rgb in named.items():
        faces = det.detect(rgb)[0]
        i = select_face(faces)
        if i is None:
            continue
        crop = align_crop(rgb, faces[i], size)
        crops += [crop, np.ascontiguousarray(crop[:, ::-1])]
        names += [f"generated:{name}", f"generated:{name}:mirrored"]
    return np.stack(crops), names


def cls_of(tower, x, blocks=BLOCKS):
    """CLS tokens ``[N, len(blocks), 768]``, one crop at a time."""
    import torch

    with torch.inference_mode():
        return torch.cat([tower(c, blocks=blocks)[0] for c in x.split(1)])


def cosines(got, ref) -> dict:
    import torch
    from torch.nn.functional import cosine_similarity

    from deepaudit.models.clip_branch import probe_inputs

    def stats(c) -> dict:
        return {"min": round(float(c.min()), 6), "mean": round(float(c.mean()), 6)}

    out: dict = {"cls": {}, "standardised": {}}
    for j, b in enumerate(BLOCKS):
        out["cls"][f"block{b}"] = stats(cosine_similarity(got[:, j], ref[:, j], dim=-1))
        # As the probe reads it: layer-normed (no affine) and L2-normalised.
        std = cosine_similarity(probe_inputs(got, (j + 1,)), probe_inputs(ref, (j + 1,)), dim=-1)
        out["standardised"][f"block{b}"] = stats(std)
    every = [v["min"] for kind in ("cls", "standardised") for v in out[kind].values()]
    out["min_over_blocks"] = min(every)  # the ship bar: >= 0.999 for every block and crop
    idx = tuple(range(1, len(BLOCKS) + 1))
    c = cosine_similarity(probe_inputs(got, idx), probe_inputs(ref, idx), dim=-1)
    out["probe"] = stats(c)
    out["probe_worst_crop"] = int(torch.argmin(c))
    return out


def same(a, b) -> dict:
    return {"identical": bool((a == b).all()), "max_abs_diff": float((a - b).abs().max())}


def independence(tower, x, batch: int = 8) -> dict:
    """A crop alone vs inside a batch of ``batch``; 1 vs 2 threads (crop by crop)."""
    import torch

    x = x[:batch]
    with torch.inference_mode():
        together = tower(x, blocks=BLOCKS)[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone1 = cls_of(tower, x)
        torch.set_num_threads(2)
        alone2 = cls_of(tower, x)
    finally:
        torch.set_num_threads(before)
    return {"batch_vs_alone": same(together, alone1), "threads_1_vs_2": same(alone1, alone2)}


def paired_times(ref, cand, x, threads: int, reps: int) -> dict:
    """ms per crop of ``ref`` and ``cand``, alternating crop by crop (ref, cand, cand,
    ref, ...), after one warm-up call each: wall time, and the process's CPU time (what
    a busy machine disturbs least at one thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall: dict[int, list] = {0: [], 1: []}
    cpu: dict[int, list] = {0: [], 1: []}
    try:
        with torch.inference_mode():
            for t in (ref, cand):
                t(x[:1], blocks=BLOCKS)
            for r in range(reps):
                c = x[r % len(x)][None]
                for k in (0, 1) if r % 2 == 0 else (1, 0):
                    w, p = time.perf_counter(), time.process_time()
                    (ref, cand)[k](c, blocks=BLOCKS)
                    cpu[k].append(time.process_time() - p)
                    wall[k].append(time.perf_counter() - w)
    finally:
        torch.set_num_threads(before)
    out = {}
    for label, d in (("wall", wall), ("cpu", cpu)):
        a, b = np.array(d[0]) * 1e3, np.array(d[1]) * 1e3
        out[label] = {"float_ms": round(float(np.median(a)), 1),
                      "ms": round(float(np.median(b)), 1),
                      "ratio": round(float(np.median(b / a)), 3)}
    return out


def main(
    candidates: Annotated[str, typer.Option(help="Comma-separated names from "
                                                 "models/clip_fast.py CANDIDATES.")] = DEFAULT,
    images: Annotated[Path, typer.Option(help="Images to crop faces from.")]
        = Path("../shared/data/images"),
    crops: Annotated[int, typer.Option(help="Crops from --images for cosines.")] = 32,
    generated: Annotated[bool, typer.Option(help="Add the demo's generated face crops "
                                                 "(photos, swaps, mirrored).")] = True,
    timing_crops: Annotated[int, typer.Option(help="Paired timings at 1 thread.")] = 10,
    timing_crops_2: Annotated[int, typer.Option(help="Paired timings at 2 threads (slow "
                                                     "on a busy machine).")] = 10,
    emulate_avx2: Annotated[bool, typer.Option(help="Force the kernels' AVX2 code paths "
                                                    "(re-runs this bench).")] = False,
    control: Annotated[bool, typer.Option(help="Also a line for the float tower against "
                                               "itself (each line times float beside it "
                                               "anyway).")] = True,
    record: Annotated[bool, typer.Option(help="Append to bench/results.")] = True,
) -> None:
    if emulate_avx2 and os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") != "AVX2":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    import torch
    from record import append_record

    from deepaudit.models import clip_fast
    from deepaudit.models.clip_branch import CLIP_PREPROCESS
    from deepaudit.models.clip_vit import load_tower

    names = [n.strip() for n in candidates.split(",") if n.strip()]
    for n in names:
        if n not in clip_fast.CANDIDATES:
            raise typer.BadParameter(f"unknown candidate {n!r}: {sorted(clip_fast.CANDIDATES)}")
    pixels, files = face_crops(images, crops)
    if generated:
        more, names_more = generated_crops()
        pixels, files = np.concatenate([pixels, more]), files + names_more
    x = CLIP_PREPROCESS.normaliser("cpu")(pixels)
    tower = load_tower()
    torch.set_num_threads(1)
    ref = cls_of(tower, x)
    isa = "avx2 (emulated)" if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") == "AVX2" else \
        f"native ({torch.backends.cpu.get_cpu_capability()})"
    source = str(images) + (" + generated" if generated else "")
    common = {"crops": len(x), "crop_source": source,
              "blocks": list(BLOCKS), "timer": "process CPU time (and wall); shared machine",
              "timing_crops": timing_crops, "timing_crops_2": timing_crops_2,
              "isa": isa, "torch": torch.__version__}
    rows = [("float", tower, {"description": "the float tower (reference)"})] if control else []
    for n in names:
        rows.append((n, clip_fast.build(n, tower),
                     {"description": clip_fast.describe(n)}))
    for name, cand, extra in rows:
        load = os.getloadavg()[0]
        cos = cosines(cls_of(cand, x), ref)
        cos["probe_worst_crop"] = files[cos["probe_worst_crop"]]
        timing = {f"threads_{k}": paired_times(tower, cand, x, k, reps)
                  for k, reps in ((1, timing_crops), (2, timing_crops_2))}
        result = {"bench": "clip_tower", "candidate": name, **extra, **common,
                  "ms_per_crop": timing,
                  "cosine_to_float": cos,
                  **independence(cand, x),
                  "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
        line = append_record(RESULTS, result) if record else result
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    typer.run(main)
