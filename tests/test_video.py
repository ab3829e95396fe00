"""Video translation: frame count, fps and size kept; an interrupted run resumed gives the same file; a corrupt frame
stops with its number and leaves a playable video of the frames before it."""

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator
from turbo_i2i.video import CorruptFrameError, frames_dir, probe, read_frames, translate_video

SIZE = (64, 48)
FPS = 12


def moving_circle_frames(n=12, size=SIZE):
    """White circle outlines on black (the built-in model's input), moving right one step per frame."""
    import cv2

    frames = []
    for i in range(n):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        cv2.circle(frame, (14 + 3 * i, size[1] // 2), 10, (255, 255, 255), 2)
        frames.append(frame)
    return frames


def write_clip(path, frames, fps=FPS, codec="libx264"):
    height, width = frames[0].shape[:2]
    pix_fmt = "yuvj444p" if codec == "mjpeg" else "yuv444p"  # 4:4:4 keeps the 1-pixel outlines crisp
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec=codec, pix_fmt_out=pix_fmt, quality=None, macro_block_size=1,
        ffmpeg_log_level="error", output_params=["-q:v", "2"] if codec == "mjpeg" else ["-crf", "10"],
    )  # fmt: skip
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def stop_after(frames, translator, clip, out, **options):
    """A run interrupted (as by Ctrl-C) once ``frames`` frames are written."""

    def interrupt(written):
        if written == frames:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        translate_video(translator, clip, out, progress=False, on_frame=interrupt, **options)


def decoded(path):
    info = probe(path)
    return info, list(read_frames(path, info.size))


@pytest.fixture(scope="module")
def translator():
    return Translator.from_pretrained("demo-circles")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", moving_circle_frames())


@pytest.fixture(scope="module")
def straight(translator, clip, tmp_path_factory):
    """An uninterrupted run (batches of 4)."""
    out = tmp_path_factory.mktemp("straight") / "out.mp4"
    result = translate_video(translator, clip, out, batch_size=4, progress=False)
    return out, result


def test_frame_count_fps_and_size_are_kept(straight, clip, translator):
    out, result = straight
    assert result.frames == 12 and result.fps == FPS and result.size == SIZE and result.resumed_from == 0
    info, frames = decoded(out)
    assert len(frames) == 12 and info.fps == FPS and info.size == SIZE
    assert imageio_ffmpeg.count_frames_and_secs(str(out)) == (12, 1.0)
    assert not frames_dir(out).exists()  # the sidecar frames are removed once the video is written
    # each frame is the model's output for that frame, up to H.264 at CRF 16 with 4:2:0 chroma (about 4 levels at
    # the model's sharp colour edges), and not its neighbour's (about 8 away)
    _, source = decoded(clip)
    for i in (0, 7, 10):
        expected, neighbour = (np.asarray(translator(Image.fromarray(source[j]), seed=0), int) for j in (i, i + 1))
        error = np.abs(frames[i].astype(int) - expected).mean()
        assert error < 5.5 and error < np.abs(frames[i].astype(int) - neighbour).mean() - 2, i


def test_tiles_reach_every_frame_and_a_resume_with_other_tiles_is_refused(translator, tmp_path):
    size = (192, 144)  # larger than the 128 px tiles, so each frame is translated in tiles
    clip = write_clip(tmp_path / "big.mp4", moving_circle_frames(n=3, size=size))
    calls = []

    class Recording:  # the translator, recording what each call was asked for
        def __getattr__(self, name):
            return getattr(translator, name)

        def __call__(self, images, **options):
            calls.append(options["tile_size"])
            return translator(images, **options)

    out = tmp_path / "out.mp4"
    translate_video(Recording(), clip, out, batch_size=2, tile_size=128, progress=False)
    assert calls == [128, 128]
    _, frames = decoded(out)
    _, source = decoded(clip)
    for i in range(3):
        expected = np.asarray(translator(Image.fromarray(source[i]), seed=0, tile_size=128), dtype=int)
        assert np.abs(frames[i].astype(int) - expected).mean() < 3, i

    stopped = tmp_path / "stopped.mp4"
    stop_after(2, translator, clip, stopped, batch_size=2, tile_size=128)
    with pytest.raises(BadInputError, match="options"):  # other tiles give other pixels: no mixing within a clip
        translate_video(translator, clip, stopped, batch_size=2, tile_size=256, progress=False, resume=True)


def test_interrupted_after_5_frames_and_resumed_gives_the_same_file(straight, translator, clip, tmp_path):
    out = tmp_path / "out.mp4"

    stop_after(5, translator, clip, out, batch_size=4)
    assert not out.exists() and len(list(frames_dir(out).glob("*.png"))) == 5
    with pytest.raises(BadInputError, match="--resume"):  # a new run does not silently discard the frames
        translate_video(translator, clip, out, batch_size=4, progress=False)
    seen = []
    result = translate_video(translator, clip, out, batch_size=4, progress=False, resume=True, on_frame=seen.append)
    assert result.resumed_from == 4 and seen == list(range(5, 13))  # restarts at the batch frame 4 was in
    assert out.read_bytes() == straight[0].read_bytes()


def test_resume_with_other_settings_is_refused(translator, clip, tmp_path):
    out = tmp_path / "out.mp4"

    stop_after(2, translator, clip, out, batch_size=2)
    # the message names each changed option with both values ("options" alone did not say which)
    with pytest.raises(BadInputError, match=r"differs in options\.prompt \(was '.+', now 'a green circle'\)\. Use"):
        translate_video(translator, clip, out, batch_size=2, prompt="a green circle", progress=False, resume=True)
    result = translate_video(translator, clip, out, batch_size=2, progress=False, overwrite=True)
    assert result.frames == 12 and result.resumed_from == 0


def test_resume_with_retrained_weights_is_refused_and_records_without_their_fingerprint_resume(
    translator, clip, tmp_path
):
    import json

    import torch

    out = tmp_path / "out.mp4"
    stop_after(2, translator, clip, out, batch_size=2)
    retrained = Translator.from_pretrained("demo-circles")  # the same folder, after another training run
    with torch.no_grad():
        next(p for n, p in retrained.generator.named_parameters() if ".skip_conv_" in n).add_(0.01)
    with pytest.raises(BadInputError, match=r"differs in trained_weights \(was '[0-9a-f]{16}', now '[0-9a-f]{16}'\)"):
        translate_video(retrained, clip, out, batch_size=2, progress=False, resume=True)
    half = Translator.from_pretrained("demo-circles", dtype=torch.bfloat16)  # channels-last weights: digest them too
    with pytest.raises(BadInputError, match=r"differs in dtype \(was 'float32', now 'bfloat16'\); trained_weights"):
        translate_video(half, clip, out, batch_size=2, progress=False, resume=True)
    record = frames_dir(out) / "meta.json"
    old = {k: v for k, v in json.loads(record.read_text()).items() if k not in ("trained_weights", "dtype")}
    record.write_text(json.dumps(old))
    result = translate_video(translator, clip, out, batch_size=2, progress=False, resume=True)  # an older record
    assert result.resumed_from == 2 and result.frames == 12


def test_corrupt_frame_stops_with_its_number_and_keeps_a_playable_video(translator, tmp_path):
    clip = write_clip(tmp_path / "clip.avi", moving_circle_frames(), codec="mjpeg")
    data = bytearray(clip.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]  # one JPEG per frame
    assert len(starts) == 12
    data[starts[7] + 2 : starts[7] + 300] = b"\x55" * 298  # frame 8 (counting from 1) is garbage
    clip.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    with pytest.raises(CorruptFrameError, match="Frame 8 ") as error:
        translate_video(translator, clip, out, batch_size=4, progress=False)
    assert error.value.frame == 8 and "7 frame(s) before it" in str(error.value)
    info, frames = decoded(out)
    assert len(frames) == 7 and info.fps == FPS and info.size == SIZE
    assert not frames_dir(out).exists()  # kept, it could serve no resume (the mended clip is another input)


def test_stochastic_model_gives_every_frame_the_same_noise(tmp_path):
    from conftest import make_generator

    from turbo_i2i.checkpoints import save_pretrained

    generator, _ = make_generator(stochastic=True, trained_seed=3, prompts={"a2b": "a sketch"}, default_r=0.3)
    translator = Translator.from_pretrained(save_pretrained(generator, tmp_path / "model"))
    frame = moving_circle_frames(1)[0]
    clip = write_clip(tmp_path / "still.mkv", [frame] * 3)
    out = tmp_path / "out.mkv"
    translate_video(translator, clip, out, batch_size=3, seed=7, progress=False)
    _, frames = decoded(out)
    # three identical input frames come out identical (one noise map), and as the seeded single call gives them
    assert len(frames) == 3 and all(np.array_equal(f, frames[0]) for f in frames)
    _, source = decoded(clip)
    seeded = [np.asarray(translator(Image.fromarray(source[0]), seed=s), dtype=int) for s in (7, 8)]
    same, other = (np.abs(frames[0].astype(int) - x).mean() for x in seeded)
    assert same < other / 2, (same, other)  # H.264 blurs this noisy tiny model's output, another seed far more


def test_bad_paths_are_bad_input(translator, clip, tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        translate_video(translator, tmp_path / "none.mp4", tmp_path / "o.mp4", progress=False)
    with pytest.raises(BadInputError, match="use one of"):
        translate_video(translator, clip, tmp_path / "o.gif", progress=False)
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(BadInputError, match="not a video"):
        translate_video(translator, tmp_path / "text.mp4", tmp_path / "o.mp4", progress=False)


def test_refused_options_and_frameless_clips_leave_no_frames_folder(translator, clip, tmp_path):
    # a run refused for its options used to leave out.mp4.frames/, which then refused the corrected run (and its
    # --resume, whose options differ)
    out = tmp_path / "out.mp4"
    bads = ({"r": 0.5}, {"direction": "b2a"}, {"edges": "blur"}, {"batch_size": 0}, {"tile_size": 5}, {"seed": 1.5})
    for bad in bads:
        with pytest.raises(BadInputError):
            translate_video(translator, clip, out, progress=False, **bad)
        assert not frames_dir(out).exists(), bad
    small = Translator.from_pretrained("demo-circles", max_pixels=1000)  # frames over the limit: refused first too
    with pytest.raises(BadInputError, match=r"Each frame of .*clip.mp4 is 64x48 = 3072 pixels, more than the limit"):
        translate_video(small, clip, out, progress=False)
    assert not frames_dir(out).exists()
    corrupt = write_clip(tmp_path / "bad.avi", moving_circle_frames(), codec="mjpeg")
    data = bytearray(corrupt.read_bytes())
    first = next(i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8)
    data[first + 2 : first + 300] = b"\x55" * 298  # the first frame is garbage: nothing to resume from
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CorruptFrameError, match="Frame 1 .*No frame was written"):
        translate_video(translator, corrupt, out, progress=False)
    assert not frames_dir(out).exists() and not out.exists()
    assert translate_video(translator, clip, out, progress=False).frames == 12


# --- the command line: videos and folders ------------------------------------------------------------------------


def test_cli_translates_a_clip_and_resumes(clip, straight, tmp_path, capsys):
    from turbo_i2i.cli import main

    out = tmp_path / "out.mp4"
    args = ["translate", "--model", "demo-circles", "--input", str(clip), "--output", str(out), "--batch-size", "4"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "wrote 12 frames (64x48, 12 fps)" in captured.out and "frame/s" in captured.err  # progress bar rate
    assert out.read_bytes() == straight[0].read_bytes()  # the CLI's video is the library's (seed 0, batches of 4)
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    # a stopped run: frames 0-5 on disk; --resume finishes it into the same file
    stopped = tmp_path / "resumed.mp4"

    def stop(written):
        if written == 6:
            raise KeyboardInterrupt

    translator = Translator.from_pretrained("demo-circles")
    with pytest.raises(KeyboardInterrupt):
        translate_video(translator, clip, stopped, batch_size=4, overwrite=True, model="demo-circles", on_frame=stop)
    resume = ["translate", "--input", str(clip), "--output", str(stopped), "--batch-size", "4"]
    assert main(resume) == 2 and "--resume" in capsys.readouterr().err
    assert main([*resume, "--resume"]) == 0
    assert stopped.read_bytes() == straight[0].read_bytes()


def test_cli_corrupt_frame_exits_2_with_the_frame_number(tmp_path, capsys):
    from turbo_i2i.cli import main

    clip = write_clip(tmp_path / "clip.avi", moving_circle_frames(), codec="mjpeg")
    data = bytearray(clip.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    data[starts[3] + 2 : starts[3] + 300] = b"\x55" * 298
    clip.write_bytes(bytes(data))
    code = main(["translate", "--input", str(clip), "--output", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "Frame 4 of" in err and "3 frame(s) before it" in err and "Traceback" not in err
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "out.mp4"))[0] == 3


def test_cli_folder_mirrors_sub_folders_skips_done_files_and_counts(tiny_model_dir, tmp_path, capsys):
    from turbo_i2i.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    rng = np.random.default_rng(0)
    names = ["a.png", "sub/b.jpg", "sub/deeper/c.png", "sub/deeper/d.webp", "other/e.bmp"]
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(src / name)
    (src / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(src / ".hidden" / "x.png")  # metadata folders are not inputs
    (src / "sub" / "notes.txt").write_text("ignored")
    run = ["translate", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(out), "--batch-size", "2"]
    assert main(run) == 2
    captured = capsys.readouterr()
    assert "translated 5, skipped 0 (already translated), failed 1" in captured.out
    assert "1 of 6 input(s)" in captured.err and "broken.png" in captured.err and "Traceback" not in captured.err
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "other/e.png", "sub/b.png", "sub/deeper/c.png", "sub/deeper/d.png"]
    assert all(Image.open(out / name).size == (32, 24) for name in written)
    before = (out / "sub" / "b.png").read_bytes()
    (src / "sub" / "broken.png").unlink()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(src / "sub" / "new.png")
    assert main(run) == 0  # a second run only translates what is new
    captured = capsys.readouterr()
    assert "translated 1, skipped 5 (already translated), failed 0" in captured.out
    assert (out / "sub" / "new.png").is_file() and (out / "sub" / "b.png").read_bytes() == before
    assert main([*run, "--overwrite"]) == 0
    assert "translated 6, skipped 0" in capsys.readouterr().out


def test_cli_folder_reports_two_inputs_with_one_output_name(tiny_model_dir, tmp_path, capsys):
    from turbo_i2i.cli import main

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (16, 16), "red").save(src / "a.jpg")
    Image.new("RGB", (16, 16), "blue").save(src / "a.png")
    code = main(["translate", "--model", str(tiny_model_dir), "--input", str(src), "--output", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 2 and "translated 1, skipped 0 (already translated), failed 1" in captured.out
    assert "same output file" in captured.err and "a.png" in captured.err


def test_cli_interrupted_video_says_how_to_resume(clip, tmp_path, monkeypatch, capsys):
    from turbo_i2i import cli, video

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "translate_video", interrupted)
    assert cli.main(["translate", "--input", str(clip), "--output", str(tmp_path / "o.mp4")]) == 130
    err = capsys.readouterr().err
    assert f"{tmp_path / 'o.mp4.frames'}; add --resume to continue" in err and "interrupted" in err


def test_a_resume_may_take_a_smaller_batch_and_spell_out_what_changes_nothing(translator, clip, straight, tmp_path):
    """After running out of memory the fix is a smaller --batch-size: the resume was refused for it (and for the
    model's default prompt spelled out, or a tile larger than the frames, which change no pixel)."""
    out = tmp_path / "out.mp4"

    (tmp_path / "model").mkdir()  # the model's folder, named once as given and once with a slash
    stop_after(5, translator, clip, out, batch_size=4, model=str(tmp_path / "model"))
    same = dict(prompt=translator.config.prompts["a2b"], edges=translator.config.preprocess, tile_size=512,
                model=f"{tmp_path / 'model'}/")  # fmt: skip
    seen = []
    result = translate_video(translator, clip, out, batch_size=3, progress=False, resume=True, on_frame=seen.append,
                             **same)  # fmt: skip
    assert result.resumed_from == 5 and seen == list(range(6, 13))  # on from the last frame written
    _, frames = decoded(out)
    _, expected = decoded(straight[0])
    assert len(frames) == 12 and np.abs(np.array(frames, int) - np.array(expected, int)).mean() < 0.5  # rounding


def test_a_frames_folder_without_its_record_is_named_and_thresholds_may_be_none(translator, clip, tmp_path):
    out = tmp_path / "out.mp4"
    stop_after(2, translator, clip, out, batch_size=2, edges=None, canny_thresholds=None)  # was a TypeError
    (frames_dir(out) / "meta.json").unlink()
    with pytest.raises(BadInputError, match="its record meta.json is missing or unreadable"):
        translate_video(translator, clip, out, batch_size=2, edges=None, progress=False, resume=True)


def test_ntsc_frame_rates_printed_rounded_are_written_exactly():
    from fractions import Fraction

    from turbo_i2i.video import frame_rate

    # ffmpeg prints 23.98; written back as 1199/50 a one-hour clip came out 0.6 s short of its source
    for shown, k in ((23.98, 24), (29.97, 30), (59.94, 60), (47.95, 48), (119.88, 120)):
        assert frame_rate(shown) == Fraction(k * 1000, 1001), shown
    for fps in (24.0, 25.0, 30.0, 12.0, 12.5, 23.9, 0.5):
        assert frame_rate(fps) == Fraction(str(fps)), fps
