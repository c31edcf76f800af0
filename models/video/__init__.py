"""Video encoder: face crops per frame -> CNN -> BiGRU over frames -> attention pooling -> 256-d."""

from models.video.model import VideoModel, VideoModelConfig
from models.video.preprocessing import FaceConfig, FaceCropper, faces_to_tensor

__all__ = ["FaceConfig", "FaceCropper", "VideoModel", "VideoModelConfig", "faces_to_tensor"]
