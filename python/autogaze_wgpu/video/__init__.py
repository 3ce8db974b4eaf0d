"""The video product: any-resolution inference, results in source-frame coordinates,
sparse-token readout, the ``patch_diff`` baseline, renderers, interframe output and metrics,
and video I/O. See docs/video.md.

Importing this package needs only numpy and Pillow; PyAV (``pip install autogaze-wgpu[video]``)
and OpenCV are imported when a reader/writer that needs them is used.
"""

from .baseline import PatchDiff, patch_diff
from .modes import MODES, ModelGrid, TileLayout, make_layout
from .pipeline import VideoGazer, run_video
from .result import FIXATION_DTYPE, FrameGaze, VideoResult, load_npz

__all__ = [
    "FIXATION_DTYPE",
    "MODES",
    "FrameGaze",
    "ModelGrid",
    "PatchDiff",
    "TileLayout",
    "VideoGazer",
    "VideoResult",
    "load_npz",
    "make_layout",
    "patch_diff",
    "run_video",
]
