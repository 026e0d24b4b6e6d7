"""Test-video factory: real, tiny video files written with PyAV, plus a zoo of broken inputs.

Every test that needs a video imports from here, so the whole suite exercises the same real
decoders (decord in the product, PyAV here) instead of mocks. Files are small (tens of frames,
under 100x100 pixels) so writing one takes milliseconds.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# extension -> (container format, video codec, pixel format); chosen so every file decord reads
# in the product has a matching writer here.
_VIDEO_FORMATS = {
    ".mp4": ("mp4", "libx264", "yuv420p"),
    ".mkv": ("matroska", "libx264", "yuv420p"),
    ".avi": ("avi", "mpeg4", "yuv420p"),
    ".webm": ("webm", "libvpx-vp9", "yuv420p"),
}


def moving_square_frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8: a bright square moving over a smooth coloured gradient.

    Low-frequency content survives lossy codecs well, so decoded frames stay close to these.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [40 + 120 * xx / max(w - 1, 1), 40 + 120 * yy / max(h - 1, 1), np.full_like(xx, 90.0)], -1
    )
    base += rng.uniform(-20, 20, size=3).astype(np.float32)
    side = max(4, min(h, w) // 4)
    colour = rng.uniform(180, 250, size=3).astype(np.float32)
    frames = np.empty((n, h, w, 3), np.uint8)
    x0, y0 = rng.integers(0, w - side), rng.integers(0, h - side)
    vx, vy = 3, 2
    for t in range(n):
        img = base.copy()
        x = (x0 + vx * t) % (w - side)
        y = (y0 + vy * t) % (h - side)
        img[y : y + side, x : x + side] = colour
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 25,
    codec: str | None = None,
    pix_fmt: str | None = None,
    container_format: str | None = None,
    container_options: dict | None = None,
) -> Path:
    """Encode (N, H, W, 3) uint8 RGB frames; codec and container follow the file extension.

    H and W must be even for yuv420p codecs. Returns the path.
    """
    path = Path(path)
    frames = np.asarray(frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, frames.shape
    fmt, default_codec, default_pix = _VIDEO_FORMATS.get(path.suffix.lower(), (None, "libx264", "yuv420p"))
    codec = codec or default_codec
    pix_fmt = pix_fmt or default_pix
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=container_format or fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            # keep every frame a faithful picture: no B-frame reordering surprises, high quality
            stream.options = {"crf": "12", "preset": "veryfast", "bf": "0"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        elif codec == "mpeg4":
            stream.bit_rate = 4_000_000  # mpeg4 has no crf; a high bit rate keeps it near-lossless
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


# ----------------------------------------------------------------------------------- bad inputs


def zero_byte(path: str | Path) -> Path:
    """An empty file with a video extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def truncated(path: str | Path, fraction: float = 0.5, n: int = 24, faststart: bool = False) -> Path:
    """A valid video (codec from the extension) cut to `fraction` of its bytes.

    In .mp4 the index (moov atom) is written last, so any cut loses it; .mkv/.webm keep their
    header and lose only trailing frames. `faststart` moves the mp4 index to the front (as in
    most web downloads, e.g. partially downloaded Kinetics clips), so only frame data is lost.
    """
    path = Path(path)
    opts = {"movflags": "faststart"} if faststart else None
    write_video(path, moving_square_frames(n, seed=3), container_options=opts)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path


def corrupt_random(path: str | Path, nbytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a .mp4 name: no container signature at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return path


def corrupt_middle(path: str | Path, n: int = 24, seed: int = 0) -> Path:
    """A valid mp4 whose middle third is overwritten with random bytes (header and index intact)."""
    path = Path(path)
    write_video(path, moving_square_frames(n, seed=4))
    data = bytearray(path.read_bytes())
    a, b = len(data) // 3, 2 * len(data) // 3
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def audio_only(path: str | Path, seconds: float = 0.5, codec: str = "aac") -> Path:
    """A real container holding one audio stream and no video stream (.m4a/.mp4 with AAC by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = 16000
    fmt = "mp4" if path.suffix.lower() in (".mp4", ".m4a") else None
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        n = int(seconds * rate)
        t = np.arange(n) / rate
        pcm = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        sample_fmt = stream.codec_context.format.name  # aac: fltp, pcm_s16le: s16
        if sample_fmt.startswith("s16"):
            samples = (pcm * 32767).astype(np.int16)[None]
        else:
            samples = pcm[None]
        step = 1024
        for i in range(0, n, step):
            chunk = np.ascontiguousarray(samples[:, i : i + step])
            frame = av.AudioFrame.from_ndarray(chunk, format=sample_fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def unsupported_codec(path: str | Path, n: int = 8) -> Path:
    """A real, valid video in a codec decord 0.6.0's bundled FFmpeg cannot decode: AV1 (SVT-AV1) in .mkv.

    The file plays in any modern FFmpeg (PyAV reads it back); see tests/test_media.py for what
    decord does with it.
    """
    path = Path(path)
    frames = moving_square_frames(n, h=64, w=64, seed=5)
    return write_video(path, frames, codec="libsvtav1", pix_fmt="yuv420p", container_format="matroska")


def one_frame(path: str | Path) -> Path:
    """A valid single-frame mp4."""
    return write_video(path, moving_square_frames(1, seed=6))


def very_short(path: str | Path, n: int = 3) -> Path:
    """A valid mp4 of only `n` (2-3) frames."""
    return write_video(path, moving_square_frames(n, seed=7))


# name -> writer(path) for every broken or borderline input; the extension each expects is the
# second element, so callers can build a directory of them in one loop.
ZOO = {
    "zero_byte": (zero_byte, ".mp4"),
    "truncated": (truncated, ".mp4"),
    "corrupt_random": (corrupt_random, ".mp4"),
    "corrupt_middle": (corrupt_middle, ".mp4"),
    "audio_only": (audio_only, ".m4a"),
    "unsupported_codec": (unsupported_codec, ".mkv"),
    "one_frame": (one_frame, ".mp4"),
    "very_short": (very_short, ".mp4"),
}


def write_zoo(directory: str | Path) -> dict[str, Path]:
    """Write every ZOO item into `directory` as <name><ext>; returns name -> path."""
    directory = Path(directory)
    return {name: fn(directory / f"{name}{ext}") for name, (fn, ext) in ZOO.items()}


def corrupt(path: str | Path, middle: bool = False, seed: int = 0) -> Path:
    """Either random bytes under a video name, or (middle=True) a valid mp4 with garbage in the middle."""
    return corrupt_middle(path, seed=seed) if middle else corrupt_random(path, seed=seed)
