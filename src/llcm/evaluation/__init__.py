"""Evaluation: named feature extractors, FID/KID/precision-recall, memorization checks.

    from llcm.evaluation import get_extractor, extract_features, compute_all
    ex = get_extractor("inception")              # or "filterbank" (offline, not comparable)
    real = extract_features(ex, "data/real")     # float64 [N, 2048]
    fake = extract_features(ex, generated_uint8)
    row = compute_all(real, fake, extractor=ex.name)   # {"extractor": "inception", "fid": ..., ...}

Every result carries the extractor's name; numbers from different extractors are never comparable.
See docs/evaluation.md.
"""

from llcm.evaluation.features import (
    EXTRACTORS,
    FeatureExtractor,
    FilterBankExtractor,
    InceptionExtractor,
    as_image_list,
    extract_features,
    get_extractor,
    list_images,
    load_images,
)
from llcm.evaluation.memorization import (
    MemorizationReport,
    MemorizationWarning,
    compose_pair,
    compose_pairs,
    find_copies,
    ssim,
)
from llcm.evaluation.metrics import (
    FeatureStats,
    cached_stats,
    compute_all,
    fid,
    fingerprint,
    frechet_distance,
    kid,
    load_stats,
    mean_cov,
    mmd2_unbiased,
    precision_recall,
    save_stats,
)

__all__ = [
    "EXTRACTORS", "FeatureExtractor", "FilterBankExtractor", "InceptionExtractor", "as_image_list",
    "extract_features", "get_extractor", "list_images", "load_images",
    "MemorizationReport", "MemorizationWarning", "compose_pair", "compose_pairs", "find_copies", "ssim",
    "FeatureStats", "cached_stats", "compute_all", "fid", "fingerprint", "frechet_distance", "kid",
    "load_stats", "mean_cov", "mmd2_unbiased", "precision_recall", "save_stats",
]
