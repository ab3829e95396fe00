"""Video translation: a clip in, the translated clip out, with the same frame count, size and frame rate.

Frames are decoded and encoded by the ffmpeg binary that ships in the ``imageio-ffmpeg`` wheel (no system ffmpeg).
Translated frames go to a sidecar folder of PNGs next to the output (``out.mp4.frames/``) as they are made, and the
video is encoded from them once at the end. So an interrupted run can be resumed from the frames already written
(``resume=True``), and because the batches are aligned to the same frame numbers and the encoder is run with
bit-exact flags, the finished file is byte-identical to the one an uninterrupted run gives.

A frame ffmpeg cannot decode stops the run with its number in the message; the frames before it are encoded into
the output, which stays a playable (shorter) video.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from . import preprocess as pre
from .errors import BadInputError, TurboI2IError
from .seeds import check_seed

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
# Output containers and the codec each gets. H.264 plays everywhere; AVI gets Motion-JPEG, which AVI players expect.
OUTPUT_CODECS = {".mp4": "libx264", ".m4v": "libx264", ".mov": "libx264", ".mkv": "libx264", ".avi": "mjpeg"}
# Near-lossless H.264: the model's output is what the user came for, re-encoding should not smear it.
CRF = "16"
FRAME_PATTERN = "{:06d}.png"
META_NAME = "meta.json"


class CorruptFrameError(BadInputError):
    """A frame of the input video cannot be decoded.

    Args:
        frame: its number, counting from 1.
        message: the whole message.
    """

    def __init__(self, frame: int, message: str):
        super().__init__(message)
        self.frame = frame


@dataclass(frozen=True)
class VideoInfo:
    """What a clip is, as ffmpeg reports it.

    Args:
        fps: frames per second.
        size: (width, height) of the frames as decoded (rotation applied).
        frames: the frame count estimated from the duration (None when unknown); the decoded count is exact.
    """

    fps: float
    size: tuple[int, int]
    frames: int | None


@dataclass(frozen=True)
class VideoResult:
    """What ``translate_video`` did.

    Args:
        output: the video written.
        frames: frames in it.
        fps: its frame rate (the input's).
        size: its frame size (the input's).
        resumed_from: frames taken from an earlier, interrupted run (0 for a fresh run).
    """

    output: Path
    frames: int
    fps: float
    size: tuple[int, int]
    resumed_from: int


def is_video(path: str | os.PathLike) -> bool:
    """Whether the file name has a video extension (``VIDEO_EXTENSIONS``)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def frames_dir(target: str | os.PathLike) -> Path:
    """The sidecar folder where the frames of ``target`` are kept until it is written (``out.mp4.frames``)."""
    target = Path(target)
    return target.with_name(f"{target.name}.frames")


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read a clip's frame rate, size and (estimated) frame count without decoding it.

    Args:
        path: the video file.

    Returns:
        a ``VideoInfo``.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"Video '{path}' does not exist; check the path.")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as error:
        # ffmpeg's own reason is on its last lines, after its version banner
        reason = [line.strip() for line in str(error).strip().splitlines() if line.strip()][-1:] or ["no reason given"]
        raise BadInputError(f"'{path}' is not a video ffmpeg can read ({reason[0][:300]}).") from error
    finally:
        reader.close()
    fps, duration = meta.get("fps") or 0.0, meta.get("duration") or 0.0
    if not fps > 0 or not meta.get("size"):
        raise BadInputError(f"'{path}' has no video stream with a frame rate ffmpeg can read.")
    estimate = round(fps * duration) if duration > 0 else None
    return VideoInfo(float(fps), tuple(meta["size"]), estimate)


def read_frames(path: str | os.PathLike, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Decode a clip frame by frame, stopping at the first frame that cannot be decoded.

    ffmpeg normally hides decoding errors (it drops or patches the frame and goes on); here it is told to stop at
    the first one (``-err_detect explode -xerror``, one decoding thread so no good frame is in flight), so the
    frames read so far are exactly those before the bad one.

    Args:
        path: the video file.
        size: (width, height) of the frames (from ``probe``).

    Yields:
        (H, W, 3) uint8 RGB frames, in order.

    Raises:
        CorruptFrameError: a frame cannot be decoded (its number counts from 1).
    """
    import imageio_ffmpeg

    width, height = size
    frame_bytes = width * height * 3
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-xerror", "-err_detect", "explode",
        "-threads", "1", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]  # fmt: skip
    count = 0
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty ffmpeg can never block on a full pipe
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        try:
            while True:
                data = process.stdout.read(frame_bytes)
                if len(data) < frame_bytes:
                    break
                count += 1
                yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
            code = process.wait()
        finally:
            if process.poll() is None:  # the consumer stopped early (interrupted): no ffmpeg left behind
                process.kill()
                process.wait()
            process.stdout.close()
        if code != 0 or data:
            log.seek(0)
            detail = log.read().decode(errors="replace").strip().splitlines()
            reason = detail[-1] if detail else f"ffmpeg exited with code {code}"
            raise CorruptFrameError(
                count + 1, f"Frame {count + 1} of '{path}' cannot be decoded ({reason.strip()[:300]})."
            )


def frame_rate(fps: float) -> Fraction:
    """The exact frame rate of a clip whose rate ffmpeg printed rounded to two decimals.

    The NTSC rates are k * 1000 / 1001 (23.976..., 29.97..., 59.94...); written back as 2398/100 a one-hour clip would
    play 0.6 s short of its source, so a rate within the rounding of one of them is taken as it.

    Args:
        fps: frames per second as read (e.g. 23.98).

    Returns:
        e.g. Fraction(24000, 1001) for 23.98, Fraction(25) for 25.0.
    """
    k = round(fps * 1.001)
    ntsc = Fraction(k * 1000, 1001)
    if k > 0 and fps != k and abs(fps - ntsc) <= 0.005 + 1e-9:
        return ntsc
    return Fraction(fps).limit_denominator(1001)


def write_video(frames: list[Path], target: str | os.PathLike, fps: float) -> Path:
    """Encode PNG frames into a video, atomically: ``target`` is either the whole new video or untouched.

    The encoder runs with bit-exact flags and no time stamps of the run, so the same frames always give the same
    bytes.

    Args:
        frames: PNG files, in order, all one size.
        target: the video file; its extension picks the container (``OUTPUT_CODECS``).
        fps: frames per second.

    Returns:
        the path written.
    """
    import imageio_ffmpeg

    target = Path(target)
    codec = OUTPUT_CODECS[target.suffix.lower()]
    with Image.open(frames[0]) as first:
        width, height = first.size
    if codec == "libx264":
        # 4:2:0 (what every player decodes) needs even sides; odd sizes keep every pixel with 4:4:4 instead.
        pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        quality = ["-crf", CRF, "-preset", "medium"]
    else:
        pix_fmt, quality = "yuvj444p", ["-q:v", "2"]
    tmp = target.with_name(f".{target.stem}.partial{target.suffix}")
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (width, height), fps=frame_rate(fps), codec=codec, pix_fmt_out=pix_fmt,
        quality=None, macro_block_size=1, ffmpeg_log_level="error",
        output_params=[*quality, "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1"],
    )  # fmt: skip
    try:
        writer.send(None)
        for path in frames:
            with Image.open(path) as frame:
                writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"))))
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return target


def translate_video(
    translator,
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    prompt: str | None = None,
    direction: str | None = None,
    r: float | None = None,
    seed: int = 0,
    edges: str | None = "default",
    canny_thresholds: tuple[int, int] = (100, 200),
    batch_size: int = 4,
    tile_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model: str | None = None,
    progress: bool = True,
    on_frame: Callable[[int], None] | None = None,
) -> VideoResult:
    """Translate every frame of a clip and write the translated clip (same frame count, size and fps).

    Every frame gets the same noise map (``seed``), so a stochastic model does not flicker from frame to frame.

    Args:
        translator: a ``Translator``.
        source: the input video.
        target: the output video (``.mp4``, ``.mov``, ``.mkv``, ``.m4v`` or ``.avi``).
        prompt, direction, r, edges, canny_thresholds: as in ``Translator.__call__``, the same for every frame.
        seed: seed of the one noise map all frames share.
        batch_size: frames per forward pass (a resume may use another).
        tile_size: translate frames larger than this in overlapping tiles (as in ``Translator.__call__``).
        resume: continue the interrupted run whose frames are in ``frames_dir(target)``.
        overwrite: replace an existing output and discard an interrupted run's frames.
        model: the model's name or path, recorded so a resume with another model is refused (a fingerprint of the
            trained weights is recorded too: a model retrained in the same folder is another model).
        progress: show a progress bar with frames per second.
        on_frame: called with the number of frames written so far after each one (tests use it to interrupt).

    Returns:
        a ``VideoResult``.

    Raises:
        CorruptFrameError: a frame cannot be decoded; the frames before it are in ``target``.
        BadInputError: bad paths, an existing output, or a resume whose settings differ from the first run's.
    """
    from tqdm import tqdm

    source, target = Path(source), Path(target)
    if target.suffix.lower() not in OUTPUT_CODECS:
        raise BadInputError(f"Cannot write a video to '{target}'; use one of {', '.join(OUTPUT_CODECS)}.")
    # before anything is written: a refused option must not leave a frames folder that blocks the corrected run
    translator.check_options(prompt, direction, batch_size, tile_size, r, edges, canny_thresholds)
    if target.exists() and not overwrite:
        raise BadInputError(f"'{target}' already exists; pass --overwrite to replace it.")
    info = probe(source)
    seed = check_seed(seed)  # before the frames folder is made: a refused run must leave nothing in the way
    pre.check_size(info.size, translator.max_pixels, f"Each frame of {source}")
    thresholds = list(canny_thresholds) if isinstance(canny_thresholds, (tuple, list)) else canny_thresholds
    options = dict(prompt=prompt, direction=direction, r=r, seed=seed, edges=edges, canny_thresholds=thresholds,
                   tile_size=tile_size)  # fmt: skip
    stat = source.stat()
    meta = {
        "source": str(source.resolve()), "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
        "model": model, "config": translator.config.to_dict(), "dtype": str(translator.dtype).removeprefix("torch."),
        "trained_weights": translator.generator.trained_digest(), "options": options, "batch_size": batch_size,
    }  # fmt: skip
    work = frames_dir(target)
    done, earlier_batch_size = _prepare_work_dir(
        work, meta, resume=resume, overwrite=overwrite, effective=partial(_effective, translator, info.size)
    )
    # Restart at a batch boundary: the frames of a batch are computed together, and a batch of other frames would
    # round differently, so the resumed run redoes the batch it was in and then matches the uninterrupted one. A
    # resume with another batch size (a smaller one after running out of memory) goes on from the last frame: its
    # file then equals an uninterrupted run's up to rounding (a level here and there), not byte for byte.
    start = done // batch_size * batch_size if earlier_batch_size == batch_size else done
    call = {**options, "canny_thresholds": canny_thresholds}
    written, pending = start, []

    def flush():
        nonlocal written
        if not pending:
            return
        # every frame draws its noise from ``seed`` alone (Translator seeds each image): one noise map, no flicker
        outputs = translator([Image.fromarray(frame) for frame in pending], batch_size=batch_size, **call)
        for image in outputs:
            pre.save_image(image, work / FRAME_PATTERN.format(written), overwrite=True)
            written += 1
            bar.update(1)
            if on_frame is not None:
                on_frame(written)
        pending.clear()

    total = 0
    with tqdm(total=info.frames, initial=start, unit="frame", desc="translating", disable=not progress) as bar:
        try:
            with closing(read_frames(source, info.size)) as frames:  # closing: ffmpeg ends with an interruption too
                for index, frame in enumerate(frames):
                    total = index + 1
                    if index < start:
                        continue  # written by the interrupted run
                    pending.append(frame)
                    if len(pending) == batch_size:
                        flush()
        except CorruptFrameError as error:
            flush()  # the good frames before the bad one are still translated
            if written:
                write_video(_frame_files(work, written), target, info.fps)
                kept = f" The {written} frame(s) before it were written to '{target}' (playable)."
            else:
                kept = " No frame was written."
            shutil.rmtree(work)  # nothing to resume from: the mended clip is another input
            raise CorruptFrameError(error.frame, f"{error}{kept}") from None
        flush()
    if total == 0:
        shutil.rmtree(work)
        raise BadInputError(f"Video '{source}' has no frames.")
    write_video(_frame_files(work, total), target, info.fps)
    shutil.rmtree(work)
    return VideoResult(target, total, info.fps, info.size, resumed_from=start)


def _frame_files(work: Path, count: int) -> list[Path]:
    return [work / FRAME_PATTERN.format(i) for i in range(count)]


def _run_size(translator, frame_size: tuple[int, int]) -> tuple[int, int]:
    """The size the translator runs a frame at (``preprocess.model_size`` under its pixel limit)."""
    return pre.model_size(*frame_size, max_pixels=max(translator.max_pixels, pre.MIN_RUN_PIXELS))


def _effective(translator, frame_size: tuple[int, int], record: dict) -> dict:
    """A run record as its options take effect, so that two runs giving the same pixels compare equal.

    A default spelled out (the model's prompt, direction, edges or r), a seed or Canny thresholds the model does not
    use, a tile larger than the frames (which tiles nothing), another spelling of the model's folder and the batch
    size (a resume may change it) make no difference. Records written by earlier versions (raw options) compare by
    the same rules.

    Args:
        translator: the ``Translator`` of this run (its config resolves the defaults).
        frame_size: (width, height) of the clip's frames.
        record: a run record (``meta.json``'s contents).

    Returns:
        the record with its options resolved and no batch size.
    """
    config, options = translator.config, dict(record.get("options") or {})
    model = record.get("model")
    if isinstance(model, str) and Path(model).exists():  # "runs/m", "runs/m/" and "./runs/m" are one folder
        model = str(Path(model).resolve())
    direction = options.get("direction") or config.default_direction
    edges = options.get("edges", "default")
    edges = config.preprocess if edges == "default" else (None if edges == "none" else edges)
    prompt, r, tile = options.get("prompt"), options.get("r"), options.get("tile_size")
    options.update(
        prompt=config.prompts.get(direction) if prompt is None else prompt, direction=direction, edges=edges,
        r=config.default_r if r is None and config.stochastic else r,
        seed=options.get("seed") if config.stochastic else None,
        canny_thresholds=options.get("canny_thresholds") if edges == "canny" else None,
        tile_size=tile if isinstance(tile, int) and max(_run_size(translator, frame_size)) > tile else None,
    )  # fmt: skip
    return {**record, "model": model, "options": options, "batch_size": None}


def _differences(earlier: dict, now: dict, prefix: str = "") -> list[str]:
    """What differs between two run records, entry by entry.

    Args:
        earlier: the interrupted run's record.
        now: this run's.
        prefix: the names of the records holding these (for nested ones).

    Returns:
        one line per differing entry, e.g. "options.seed (was 0, now 7)" (long values are not shown).
    """
    found = []
    for key in sorted(earlier.keys() | now.keys()):
        was, new = earlier.get(key), now.get(key)
        if isinstance(was, dict) and isinstance(new, dict):
            found += _differences(was, new, f"{prefix}{key}.")
        elif was != new:
            values = f" (was {was!r}, now {new!r})" if len(repr(was)) + len(repr(new)) < 80 else ""
            found.append(f"{prefix}{key}{values}")
    return found


def _prepare_work_dir(
    work: Path, meta: dict, resume: bool, overwrite: bool, effective: Callable[[dict], dict]
) -> tuple[int, int | None]:
    """Create or check the sidecar folder; return how many leading frames an earlier run already wrote.

    Args:
        work: the sidecar folder.
        meta: this run's source, model and settings (stored there; on resume, the record there is taken over with
            this run's batch size when that changed).
        resume: continue an earlier run.
        overwrite: discard an earlier run's frames.
        effective: a record as its settings take effect; the earlier run's and this run's must be equal to resume.

    Returns:
        (the number of consecutive frames from frame 0 found there, the batch size they were made with): (0, this
        run's) for a new run.
    """
    if work.exists() and not resume:
        if not overwrite:
            raise BadInputError(
                f"An interrupted run left its frames in '{work}'; pass --resume to continue it or --overwrite to"
                " start over."
            )
        shutil.rmtree(work)
    if work.is_dir():
        try:
            earlier = json.loads((work / META_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict):
            raise BadInputError(
                f"Cannot resume from '{work}': its record {META_NAME} is missing or unreadable, so the frames there"
                " cannot be told to match this run; pass --overwrite to start over."
            )
        was, now = effective(earlier), effective(json.loads(json.dumps(meta)))
        for key in ("trained_weights", "dtype"):
            if key not in was:  # a record from before these were kept
                now.pop(key)
        changed = _differences(was, now)
        if changed:
            raise BadInputError(
                f"Cannot resume from '{work}': the interrupted run differs in {'; '.join(changed)}."
                " Use the same input, model and options, or pass --overwrite to start over."
            )
        done = 0
        while (work / FRAME_PATTERN.format(done)).is_file():
            done += 1
        if earlier.get("batch_size") != meta["batch_size"]:
            _write_meta(work, meta)
        return done, earlier.get("batch_size")
    try:
        work.mkdir(parents=True)
        _write_meta(work, meta)
    except OSError as error:
        raise TurboI2IError(f"Cannot create '{work}' for the frames ({error.strerror}); check the folder.") from error
    return 0, meta["batch_size"]


def _write_meta(work: Path, meta: dict) -> None:
    """Write a run record into its frames folder (``META_NAME``), replacing the one there."""
    (work / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
