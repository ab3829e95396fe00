import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from turbo_i2i.cli import build_parser, main


def write_picture(path, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def run(tiny_model_dir, capsys):
    def _run(*args):
        code = main(["translate", "--model", str(tiny_model_dir), *map(str, args)])
        return code, capsys.readouterr().err

    return _run


def test_translate_one_file(run, tmp_path):
    source = write_picture(tmp_path / "in.png", (40, 24))
    code, err = run("--input", source, "--output", tmp_path / "out.png")
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (40, 24)
    # "new/" names a folder, made for it (was "Cannot write 'new': use one of .jpg, ...")
    assert run("--input", source, "--output", f"{tmp_path / 'new'}/")[0] == 0
    assert Image.open(tmp_path / "new" / "in.png").size == (40, 24)


def test_existing_output_is_kept_unless_overwrite(run, tmp_path):
    source = write_picture(tmp_path / "in.png")
    (tmp_path / "out.png").write_bytes(b"precious")
    code, err = run("--input", source, "--output", tmp_path / "out.png")
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "out.png").read_bytes() == b"precious"
    code, _ = run("--input", source, "--output", tmp_path / "out.png", "--overwrite")
    assert code == 0 and Image.open(tmp_path / "out.png").size == (32, 32)


def test_folder_with_a_bad_file_translates_the_rest(run, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_picture(src / f"ok{i}.png", seed=i)
    (src / "broken.png").write_text("this is not a png")
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ok0.png").write_bytes(b"keep me")
    code, err = run("--input", src, "--output", out)
    assert code == 2 and "broken.png" in err and "1 of 4" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["ok0.png", "ok1.png", "ok2.png"]
    assert (out / "ok0.png").read_bytes() == b"keep me"  # existing output untouched without --overwrite
    assert "kept 1 existing" in err


def test_a_folder_translates_into_the_folder_above_it(run, tmp_path):
    # the check that keeps an output folder inside the input from being read back used to drop every input here
    (tmp_path / "photos").mkdir()
    write_picture(tmp_path / "photos" / "p.png")
    code, err = run("--input", tmp_path / "photos", "--output", tmp_path)
    assert code == 0, err
    assert Image.open(tmp_path / "p.png").size == (32, 32)


def test_a_folder_is_searched_as_a_tree_and_mirrored(run, tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for folder in (src / "day" / "deep", src / ".git", elsewhere):
        folder.mkdir(parents=True)
    write_picture(src / "top.tif")  # TIFF and GIF are read one by one; in a folder they were skipped silently
    write_picture(src / "day" / "a.gif")
    write_picture(src / "day" / "deep" / "b.jpg")
    write_picture(src / ".git" / "hidden.png")  # metadata, not pictures
    write_picture(src / "._top.png")
    write_picture(elsewhere / "linked.png")
    (src / "link").symlink_to(elsewhere)  # a linked folder is followed
    (src / "day" / "loop").symlink_to(src)  # ... but each folder is read once
    (src / "out").mkdir()
    write_picture(src / "out" / "old.png")  # the output folder inside the input is not read back
    code, err = run("--input", src, "--output", src / "out")
    assert code == 0, err
    written = sorted(p.relative_to(src / "out").as_posix() for p in (src / "out").rglob("*.png"))
    assert written == ["day/a.png", "day/deep/b.png", "link/linked.png", "old.png", "top.png"]


def test_folder_batches_give_the_images_of_single_calls(run, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):  # two sizes, so batches mix sizes and the Translator groups them
        write_picture(src / f"im{i}.png", size=(32, 32) if i % 2 else (24, 40), seed=i)
    for batch in (1, 3):
        code, err = run("--input", src, "--output", tmp_path / f"out{batch}", "--batch-size", batch)
        assert code == 0, err
    for i in range(5):
        one, three = (np.asarray(Image.open(tmp_path / f"out{b}" / f"im{i}.png"), dtype=int) for b in (1, 3))
        assert one.shape == three.shape and np.abs(one - three).max() <= 1  # batching changes float rounding only


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["--input", "{tmp}/missing.png"], "does not exist"),
        ("empty_dir", ["--input", "{tmp}/empty"], "no images"),
        ("text_png", ["--input", "{tmp}/text.png"], "text.png"),
        ("huge", ["--input", "{tmp}/huge.png"], "pixels"),
        ("ok", ["--input", "{tmp}/ok.png", "--prompt", ""], "empty"),
        ("ok", ["--input", "{tmp}/ok.png", "--edges", "canny", "--canny-low", "300"], "thresholds"),
        ("ok", ["--input", "{tmp}/ok.png", "--r", "0.5"], "stochastic"),
    ],
)
def test_bad_input_exits_2_with_a_message(run, tmp_path, setup, args, message):
    if setup == "empty_dir":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.txt").write_text("x")
    elif setup == "text_png":
        (tmp_path / "text.png").write_text("hello")
    elif setup == "huge":
        Image.new("L", (4200, 4200)).save(tmp_path / "huge.png")
    elif setup == "ok":
        write_picture(tmp_path / "ok.png")
    code, err = run(*[a.format(tmp=tmp_path) for a in args], "--output", tmp_path / "out.png")
    assert code == 2 and (message in err or message in err.lower()), err
    assert "Traceback" not in err and not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("command", ["translate", "bench"])
def test_compile_takes_an_optional_torch_compile_mode(command, capsys):
    base = [command, "--input", "a.png", "--output", "b.png"] if command == "translate" else [command]
    parser = build_parser()
    assert parser.parse_args(base).compile is False
    assert parser.parse_args([*base, "--compile"]).compile is True
    assert parser.parse_args([*base, "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([*base, "--compile", "fast"])
    assert stop.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_unknown_model_lists_known_names(tmp_path, capsys):
    write_picture(tmp_path / "in.png")
    code = main(
        ["translate", "--model", "nope", "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "o.png")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "demo-circles" in err and "day_to_night" in err


def test_models_lists_every_named_model(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("demo-circles", "edge_to_image", "sketch_to_image_stochastic", "day_to_night", "rainy_to_clear"):
        assert name in out


def test_console_script_reports_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "turbo_i2i.cli",
            "translate",
            "--input",
            str(tmp_path / "none.png"),
            "--output",
            "x.png",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    usage = subprocess.run([sys.executable, "-m", "turbo_i2i.cli", "translate"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--input" in usage.stderr


def test_help_and_data_generation_do_not_load_torch(tmp_path):
    """The parser (every training option is a flag) and the commands that do not run a model import no torch,
    diffusers or transformers: ``turbo-i2i --help`` answers at once instead of after seconds of imports."""
    script = (
        "import sys\n"
        "from turbo_i2i.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        f"assert main(['data', 'circles', '--out', {str(tmp_path / 'data')!r}, '--n', '4']) == 0\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    assert (tmp_path / "data" / "train_A").is_dir()


def test_a_reader_that_stops_early_gets_no_traceback():
    """`turbo-i2i models | true`: the pipe closes before the listing is written; the command ends quietly."""
    done = subprocess.run(
        f"{sys.executable} -m turbo_i2i.cli models | true", shell=True, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


SCHEDULERS = "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"


@pytest.mark.parametrize(
    "task,flag,value,message",
    [
        ("paired", "--mixed-precision", "fp8", "Unknown mixed_precision 'fp8'; choose one of no, bf16, fp16, auto."),
        ("unpaired", "--mixed-precision", "fp8", "Unknown mixed_precision 'fp8'; choose one of no, bf16, fp16, auto."),
        ("paired", "--disc", "stylegan", "Unknown disc 'stylegan'; choose one of clip, patchgan, none."),
        ("unpaired", "--disc", "stylegan", "Unknown disc 'stylegan'; choose one of clip, patchgan, none."),
        ("unpaired", "--step-mode", "both", "Unknown step_mode 'both'; choose one of joint, separate."),
        ("paired", "--lr-scheduler", "bogus", f"Unknown lr_scheduler 'bogus'; choose one of {SCHEDULERS}."),
        ("unpaired", "--report-to", "bogus", "Unknown report_to 'bogus'; choose one of tensorboard, wandb, mlflow,"),
        ("paired", "--seed", str(2**64), "--seed must be between -9223372036854775808 and 18446744073709551615"),
        # PyTorch's own errors came as tracebacks, a negative evaluation count only at the first evaluation (after
        # training, losing its checkpoint), and 0 steps exported an untrained model
        ("paired", "--learning-rate", "-1", "--learning-rate must be more than 0, got -1.0."),
        ("unpaired", "--learning-rate", "0", "--learning-rate must be more than 0, got 0.0."),
        ("paired", "--adam-weight-decay", "-1", "--adam-weight-decay must be 0 or more, got -1.0."),
        ("paired", "--max-steps", "0", "--max-steps must be at least 1, got 0."),
        ("unpaired", "--batch-size", "0", "--batch-size must be at least 1, got 0."),
        ("paired", "--eval-every", "0", "--eval-every must be at least 1, got 0."),
        ("paired", "--checkpoint-every", "0", "--checkpoint-every must be at least 1, got 0."),
        ("unpaired", "--keep-checkpoints", "0", "--keep-checkpoints must be at least 1, got 0."),
        ("paired", "--num-eval", "-1", "--num-eval must be 0 or more, got -1."),
        ("unpaired", "--lambda-cycle", "-1", "--lambda-cycle must be 0 or more, got -1.0."),
    ],
)
def test_a_bad_training_option_exits_2_naming_it(tmp_path, capsys, task, flag, value, message):
    # refused by the config, before anything loads, the data set is read or anything is written
    out = tmp_path / "run"
    code = main(["train", task, "--dataset", str(tmp_path / "data"), "--output-dir", str(out), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_the_offered_lr_schedulers_and_trackers_are_diffusers_and_accelerates_own():
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    from turbo_i2i.training.options import LR_SCHEDULERS, REPORT_TO

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert set(REPORT_TO) - {"none"} == {t.value for t in LoggerType}


@pytest.mark.parametrize("flag", ["--gradient-checkpointing", "--compile"])
def test_stochastic_training_refuses_what_would_ignore_its_per_step_r(tmp_path, capsys, flag):
    # checkpointing would recompute at the trained strength; compiled parts would recompile for every new r
    out = tmp_path / "run"
    args = ["train", "paired", "--dataset", str(tmp_path / "data"), "--output-dir", str(out), "--stochastic", flag]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and f"--stochastic cannot be combined with {flag} yet." in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("task", ["paired", "unpaired"])
def test_every_training_flag_says_what_it_does_and_its_default(task, capsys):
    """The flags' help comes from the config docstrings (written once, beside the fields): every option has one, a
    recipe's own description and default win over the shared ones."""
    from dataclasses import fields

    from turbo_i2i.training.options import PairedTrainConfig, UnpairedTrainConfig, option_help

    config = PairedTrainConfig if task == "paired" else UnpairedTrainConfig
    descriptions = option_help(config)
    assert all(descriptions.get(f.name) for f in fields(config) if f.name != "extra")
    with pytest.raises(SystemExit) as done:
        main(["train", task, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--gradient-accumulation-steps GRADIENT_ACCUMULATION_STEPS batches whose gradients are summed into one"
        " optimiser step (the effective batch is batch_size * gradient_accumulation_steps * processes). (default: 1)"
    ) in text
    learning_rate = "(default: 5e-06)" if task == "paired" else "(default: 1e-05)"
    assert f"for the generator and the discriminator. {learning_rate} --lr-scheduler" in text
    layout = "in the paired layout" if task == "paired" else "in the unpaired layout"
    assert f"--dataset DATASET a folder {layout}" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["translate", "--input", "x.png", "--output", "y.png", "--seed", "99999999999999999999"],
            "a seed must be between -9223372036854775808 and 18446744073709551615",
        ),
        (["translate", "--input", "x.png", "--output", "y.png", "--device", "bogus"], "'bogus' is not a torch device"),
        (["eval", "--outputs", "o", "--references", "r", "--device", "cuda:7"], "'cuda:7': this machine has"),
        (["demo", "--port", "70000"], "a port must be between 1 and 65535"),
        (["train", "unpaired", "--dataset", "d", "--output-dir", "o", "--stop-at", "0"], "a step must be at least 1"),
        # not "invalid _seed value: '2.7'" (the type function's private name)
        (["translate", "--input", "x.png", "--output", "y.png", "--seed", "2.7"], "a seed must be a whole number"),
        (["demo", "--port", "http"], "a port must be a whole number, got 'http'"),
        (["train", "paired", "--dataset", "d", "--output-dir", "o", "--stop-at", "1e3"], "a step must be a whole"),
    ],
)
def test_an_impossible_number_or_device_is_a_usage_error(args, message, capsys):
    """Checked when the command line is read (exit 2, before anything is written; a seed too large for torch used
    to fail at the first image, after a video's frame folder was made)."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err, err


def test_the_input_itself_is_never_the_output(run, tmp_path):
    source = write_picture(tmp_path / "in.png")
    before = source.read_bytes()
    code, err = run("--input", source, "--output", source, "--overwrite")
    assert code == 2 and "is the input itself" in err
    code, err = run("--input", tmp_path, "--output", tmp_path)  # a folder into itself
    assert code == 2 and "is the input itself" in err and "holds no images" not in err
    assert source.read_bytes() == before


def test_resume_for_one_image_is_refused_and_for_a_folder_keeps_what_it_finds(run, tmp_path):
    (tmp_path / "in").mkdir()
    source = write_picture(tmp_path / "in" / "a.png")
    code, err = run("--input", source, "--output", tmp_path / "out.png", "--resume")
    assert code == 2 and f"{source} is neither: leave --resume out" in err and not (tmp_path / "out.png").exists()
    assert run("--input", source.parent, "--output", tmp_path / "outs")[0] == 0
    (tmp_path / "outs" / "a.png").write_bytes(b"kept")
    assert run("--input", source.parent, "--output", tmp_path / "outs", "--resume")[0] == 0
    assert (tmp_path / "outs" / "a.png").read_bytes() == b"kept"


def test_an_existing_scores_file_is_never_replaced(tmp_path, capsys):
    outputs, references = tmp_path / "outs", tmp_path / "refs"
    for folder in (outputs, references):
        folder.mkdir()
        write_picture(folder / "0001.png")
    scored = outputs / "0001.png"
    before = scored.read_bytes()
    args = ["eval", "--outputs", str(outputs), "--references", str(references), "--no-fid", "--no-lpips"]
    assert main([*args, "--json", str(scored)]) == 2
    assert "already exists; pick another --json" in capsys.readouterr().err and scored.read_bytes() == before
    assert main([*args, "--json", str(tmp_path / "scores.json")]) == 0
    assert main([*args, "--unpaired"]) == 2  # no reference per image, no set metric: nothing would be measured
    assert "Nothing to compute" in capsys.readouterr().err


def test_an_unknown_demo_model_is_refused_before_serving(capsys, monkeypatch):
    from turbo_i2i.demo import app

    monkeypatch.setattr(app, "launch_app", lambda **kwargs: pytest.fail("served an unknown model"))
    assert main(["demo", "--model", "no-such-model"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err


def test_convert_into_a_place_it_cannot_write_exits_2_and_leaves_nothing(tmp_path, capsys):
    import torch
    from official_format import official_paired

    from turbo_i2i.backbone import load_backbone

    backbone = load_backbone("tiny")
    torch.save(official_paired(backbone.unet, backbone.vae), tmp_path / "official.pkl")
    (tmp_path / "file.txt").write_text("in the way")
    out = tmp_path / "file.txt" / "model"
    code = main(["convert", "--input", str(tmp_path / "official.pkl"), "--output", str(out), "--base-model", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot write {out}" in err and "Traceback" not in err, err
    assert (tmp_path / "file.txt").read_text() == "in the way"


def test_convert_reads_the_kind_and_defaults_of_the_model_its_file_name_or_name_says(tmp_path, capsys, monkeypatch):
    import json

    import torch
    from official_format import official_paired

    from turbo_i2i import checkpoints
    from turbo_i2i.backbone import DEFAULT_BACKBONE, load_backbone
    from turbo_i2i.checkpoints import load_pretrained

    backbone = load_backbone("tiny")
    sketch = tmp_path / "sketch_to_image_stochastic_lora.pkl"  # the published name
    torch.save(official_paired(backbone.unet, backbone.vae, stochastic=True), sketch)
    assert main(["convert", "--input", str(sketch), "--output", str(tmp_path / "a"), "--base-model", "tiny"]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["preprocess"] == "sketch" and config["default_r"] == 0.4  # were left out without --name
    capsys.readouterr()
    # a name of another kind of model is refused (its captions and defaults would be silently wrong)
    args = ["convert", "--input", str(sketch), "--output", str(tmp_path / "b"), "--base-model", "tiny"]
    for name, kind in (("day_to_night", "unpaired"), ("edge_to_image", "paired")):
        assert main([*args, "--name", name]) == 2
        err = capsys.readouterr().err
        assert f"holds a stochastic paired model, not the {kind} one its file name or --name says" in err, err
    assert not (tmp_path / "b").exists()

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like a built-in backbone: the built-in is what loads, and is named
    assert main(["convert", "--input", str(sketch), "--output", str(tmp_path / "t"), "--base-model", "tiny"]) == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["base_model"] == "tiny"
    # a local copy of the backbone: the config names SD-Turbo (a folder may not point outside itself) and loads
    local = tmp_path / "sd-turbo-copy"
    local.mkdir()
    read = []
    monkeypatch.setattr(checkpoints, "load_backbone", lambda name, **kw: read.append(name) or load_backbone("tiny"))
    assert main(["convert", "--input", str(sketch), "--output", str(tmp_path / "c"), "--base-model", str(local)]) == 0
    assert read == [str(local)] and f"to read it from {local}, pass --base-model" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "config.json").read_text())["base_model"] == DEFAULT_BACKBONE
    generator, _ = load_pretrained(tmp_path / "c", base_model=local)  # was refused: an absolute path in its config
    assert str(read[-1]) == str(local) and generator.config.stochastic


def test_an_interrupted_training_run_says_how_to_continue(monkeypatch, capsys):
    from turbo_i2i import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert main(["train", "unpaired", "--dataset", "d", "--output-dir", "o"]) == 130
    assert "interrupted; continue from the last checkpoint with --resume" in capsys.readouterr().err


@pytest.mark.parametrize("source,output", [("in.png", "out.gif"), ("in.png", "out"), ("in.png", "out.mp4")])
def test_an_output_format_it_cannot_write_is_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch, source, output
):
    from turbo_i2i.pipeline import Translator

    monkeypatch.setattr(Translator, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    write_picture(tmp_path / source)
    code = main(["translate", "--input", str(tmp_path / source), "--output", str(tmp_path / output)])
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot write '{tmp_path / output}': use one of .jpg" in err, err


@pytest.mark.parametrize("args,message", [(["--prompt", " "], "prompt is empty"), (["--tile", "100"], "--tile must")])
def test_options_the_model_would_refuse_are_refused_before_it_loads(tmp_path, capsys, monkeypatch, args, message):
    # with a folder, each file used to fail alone after the model had loaded
    from turbo_i2i.pipeline import Translator

    monkeypatch.setattr(Translator, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "photos").mkdir()
    write_picture(tmp_path / "photos" / "a.png")
    code = main(["translate", "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_inside_the_input_never_replaces_its_pictures(run, tmp_path, caplog):
    src = tmp_path / "ow"
    (src / "s").mkdir(parents=True)
    write_picture(src / "a.png")
    original = write_picture(src / "s" / "a.png", seed=5).read_bytes()  # an input picture, where a.png's output goes
    code, err = run("--input", src, "--output", src / "s", "--overwrite")
    assert code == 2 and "lies inside the input folder and holds 1 picture(s) already" in err, err
    assert (src / "s" / "a.png").read_bytes() == original  # was replaced by the translation of ow/a.png
    code, err = run("--input", src, "--output", src / "s")  # without --overwrite nothing is replaced: it says so
    assert code == 0 and err.count("its 1 picture(s) are not read as inputs") == 1, err  # once: listed once
    assert (src / "s" / "a.png").read_bytes() == original


@pytest.mark.parametrize(
    "args,message",
    [
        (["--output", "{tmp}/afile/out"], "Cannot write {tmp}/afile/out: {tmp}/afile is not a writable folder"),
        (["--output", ""], "--output: needs a path, got an empty string"),
        (["--edges", "canny", "--canny-low", "300"], "Canny thresholds must satisfy"),
    ],
)
def test_a_folder_run_that_would_fail_for_every_image_is_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch, args, message
):
    from turbo_i2i.pipeline import Translator

    monkeypatch.setattr(Translator, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "photos").mkdir()
    write_picture(tmp_path / "photos" / "a.png")
    (tmp_path / "afile").write_text("a file where a folder would go")
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) if not args[-1] else contextlib.nullcontext() as exit_info:
        code = main(["translate", "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out"), *args])
    code = exit_info.value.code if exit_info else code
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err


def test_r_for_a_deterministic_model_is_refused_once_for_a_folder(run, tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        write_picture(tmp_path / "photos" / f"{i}.png", seed=i)
    code, err = run("--input", tmp_path / "photos", "--output", tmp_path / "out", "--r", "0.5")
    assert code == 2 and err.count("r applies only to stochastic models") == 1, err  # was once per image
    assert not (tmp_path / "out").exists()


def test_a_folder_takes_each_images_caption_from_prompts(run, tmp_path):
    src = tmp_path / "src"
    (src / "day").mkdir(parents=True)
    write_picture(src / "a.png", seed=1)
    write_picture(src / "day" / "b.jpg", seed=2)
    write_picture(src / "c.png", seed=3)
    captions = {"a.png": "a red circle", "day/b": "a blue square"}  # with and without the extension
    (tmp_path / "prompts.json").write_text(json.dumps(captions))
    code, err = run(
        "--input", src, "--output", tmp_path / "out", "--prompts", tmp_path / "prompts.json", "--batch-size", 3,
        "--prompt", "a green triangle",  # c.png has no caption of its own
    )  # fmt: skip
    assert code == 0, err
    for name, prompt in (("a.png", "a red circle"), ("day/b.jpg", "a blue square"), ("c.png", "a green triangle")):
        out = tmp_path / "one" / Path(name).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        assert run("--input", src / name, "--output", out, "--prompt", prompt)[0] == 0
        folder = np.asarray(Image.open(tmp_path / "out" / Path(name).with_suffix(".png")), dtype=int)
        assert np.abs(folder - np.asarray(Image.open(out), dtype=int)).max() <= 1, name  # batching: rounding only
    # the captions are what made the difference: another caption gives another picture
    assert run("--input", src / "a.png", "--output", tmp_path / "other.png", "--prompt", "a blue square")[0] == 0
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "other.png")), np.asarray(Image.open(tmp_path / "out/a.png"))
    )


@pytest.mark.parametrize(
    "captions,extra,message",
    [
        ({"a.png": "a red circle"}, [], "1 of 2 file(s) have no caption in {tmp}/prompts.json: day/b.jpg"),
        ({"a.png": "a red circle", "day/b.jpg": 7}, ["--prompt", "x"], "not non-empty text: day/b.jpg (7)"),
        ({"a.png": "a red circle", "day/b.jpg": " "}, [], 'day/b.jpg (" ")'),
        ('["a list"]', [], "must hold one JSON object"),
        ("{not json", [], "is not readable JSON"),
    ],
)
def test_prompts_without_a_caption_for_every_image_are_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch, captions, extra, message
):
    from turbo_i2i.pipeline import Translator

    monkeypatch.setattr(Translator, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "photos" / "day").mkdir(parents=True)
    write_picture(tmp_path / "photos" / "a.png")
    write_picture(tmp_path / "photos" / "day" / "b.jpg")
    (tmp_path / "prompts.json").write_text(captions if isinstance(captions, str) else json.dumps(captions))
    args = ["--input", tmp_path / "photos", "--output", tmp_path / "out", "--prompts", tmp_path / "prompts.json"]
    code = main(["translate", "--model", "x", *map(str, args + extra)])
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_prompts_for_one_image_is_refused(run, tmp_path):
    (tmp_path / "prompts.json").write_text("{}")
    code, err = run("--input", write_picture(tmp_path / "a.png"), "--output", tmp_path / "b.png", "--prompts",
                    tmp_path / "prompts.json")  # fmt: skip
    assert code == 2 and "pass --prompt instead" in err and not (tmp_path / "b.png").exists()
