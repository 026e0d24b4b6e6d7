"""Released X-CLIP models (microsoft/VideoX, X-CLIP model zoo), run online on video files.

The full model: CLIP's image tower with CCT message tokens in every block, MIT, the
video-specific prompt generator and CLIP's text tower, built from the release's own state dict
(`layout`), with the equations in `model` and X-CLIP's test preprocessing in `run`
(docs/heads.md, "Released X-CLIP models").
"""

from evl_cache.xclip_release.layout import ReleaseConfig, check_layout, infer_config, read_release, release_layout
from evl_cache.xclip_release.run import ReleasePredictor, ReleaseViews, evaluate_release, predict_release

__all__ = ["ReleaseConfig", "ReleasePredictor", "ReleaseViews", "check_layout", "evaluate_release", "infer_config",
           "predict_release", "read_release", "release_layout"]
