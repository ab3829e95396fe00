"""Evaluation: clean-fid FID, DINO structure distance, CLIP score, folder-vs-folder scoring (``turbo-i2i eval``).

Trainers call these on in-memory tensors (images in [-1, 1]); every pretrained network has a loader (hub / cache /
local file, one clear paragraph when it is missing offline) and a tiny seeded stand-in for tests:

- FID: ``compute_fid(outputs, references, net)`` with ``net = load_inception()`` / ``tiny_inception()``; cache the
  references with ``fid_statistics(folder, net)``.
- DINO structure: ``DINOStructureDistance(load_dino())(inputs, outputs) -> (N,)``.
- CLIP score: ``clip_score(images, captions, CLIPSimLoss(*load_clip()))``.
- Folders: ``evaluate_folders(outputs_dir, references_dir, ...) -> EvalReport``.
"""

from .clip_score import clip_score, clip_similarities
from .dino_structure import (
    DINOStructureDistance,
    cosine_self_similarity,
    load_dino,
    self_similarity_mse,
    structure_distance_from_keys,
    tiny_dino,
)
from .fid import (
    FIDStatistics,
    compute_fid,
    fid_statistics,
    frechet_distance,
    image_features,
    load_inception,
    tiny_inception,
)
from .metrics import EvalNetworks, EvalReport, evaluate_folders, load_networks

__all__ = [
    "DINOStructureDistance",
    "EvalNetworks",
    "EvalReport",
    "FIDStatistics",
    "clip_score",
    "clip_similarities",
    "compute_fid",
    "cosine_self_similarity",
    "evaluate_folders",
    "fid_statistics",
    "frechet_distance",
    "image_features",
    "load_dino",
    "load_inception",
    "load_networks",
    "self_similarity_mse",
    "structure_distance_from_keys",
    "tiny_dino",
    "tiny_inception",
]
