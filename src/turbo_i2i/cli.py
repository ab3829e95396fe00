"""The ``turbo-i2i`` command line: thin wrappers around the library.

Exit codes: 0 ok, 2 usage or bad input, 1 any other failure (e.g. weights that cannot be found).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from .cpu_memory import reuse_freed_memory
from .errors import BadInputError, TurboI2IError
from .seeds import check_seed

DTYPES = ("float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
STDOUT = "-"  # --json -: the JSON on standard output instead of the table
logger = logging.getLogger("turbo_i2i")


def _whole(text: str, what: str) -> int:
    """``text`` as an int, or argparse's error naming ``what`` (a bare ValueError shows the type's function name:
    "invalid _seed value")."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None


def _seed(text: str) -> int:
    """An argparse type: a seed torch's generators take (``seeds.SEEDS``)."""
    try:
        return check_seed(_whole(text, "a seed"), "a seed")
    except BadInputError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None


def _path(text: str) -> str:
    """An argparse type: a path that is not empty (an empty one would mean the current folder, silently)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("needs a path, got an empty string")
    return text


def _step(text: str) -> int:
    """An argparse type: a training step (1 or more)."""
    value = _whole(text, "a step")
    if value < 1:
        raise argparse.ArgumentTypeError(f"a step must be at least 1, got {text}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port (1-65535)."""
    value = _whole(text, "a port")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be between 1 and 65535, got {text}")
    return value


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (``devices.check_device``)."""
    from .devices import check_device

    try:
        check_device(text)
    except BadInputError as error:
        raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None
    return text


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate an image, a folder of images (sub-folders too) or a video")
    p.add_argument(
        "--model", type=_path, default="demo-circles", help="named model, model folder, official .pkl or hub id"
    )
    p.add_argument(
        "--base-model", help="backbone to load the model on (hub id or local diffusers folder) instead of its own"
    )
    p.add_argument(
        "--input", type=_path, required=True, help="an image, a folder of images (sub-folders too) or a video (.mp4)"
    )
    p.add_argument(
        "--output", type=_path, required=True, help="output file (image or video) or folder (mirrors the input's tree)"
    )
    p.add_argument("--prompt", help="caption of the output (default: the model's)")
    p.add_argument(
        "--prompts", type=_path,
        help="folders: JSON file {path inside the folder: caption} (a data set's test_prompts.json); --prompt then"
        " captions the files it does not name",
    )  # fmt: skip
    p.add_argument("--direction", choices=("a2b", "b2a"), help="unpaired models: which way to translate")
    p.add_argument("--r", type=float, help="stochastic models: faithfulness to the input in [0, 1]")
    p.add_argument(
        "--seed", type=_seed,
        help="seed of the noise map; the same seed gives the same image (videos: default 0, one map for all frames)",
    )  # fmt: skip
    p.add_argument(
        "--edges", choices=("default", "canny", "sketch", "none"), default="default",
        help="turn the input into the model's input: canny edges, a binarised sketch, or as is (default: model's)",
    )  # fmt: skip
    p.add_argument("--canny-low", type=int, default=100, help="Canny low threshold, 0-255 (default 100)")
    p.add_argument("--canny-high", type=int, default=200, help="Canny high threshold, 0-255 (default 200)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight precision (bfloat16: see Performance)")
    _add_compile(p, "torch.compile the translation (GPUs, big folders and videos: the first call compiles)")
    p.add_argument("--batch-size", type=int, default=4, help="images or video frames per forward pass (default 4)")
    p.add_argument(
        "--tile", type=int, metavar="PIXELS",
        help="images larger than this go through in overlapping tiles of this size: flat memory for any size",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (and a stopped video's frames)")
    p.add_argument(
        "--resume", action="store_true",
        help="videos: continue a stopped run from the frames it wrote (folder runs always keep the outputs they find)",
    )  # fmt: skip


def _add_compile(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--compile", nargs="?", const=True, default=False, metavar="MODE", choices=COMPILE_MODES,
        help=f"{what}; MODE, torch.compile's: {', '.join(COMPILE_MODES)} (reduce-overhead: CUDA graphs on GPUs; "
        "no MODE: default)",
    )  # fmt: skip


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="web demo: draw or upload, get the translated picture (local only by default)")
    p.add_argument("--model", default="demo-circles", help="the model picked when the page opens")
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off unless given)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu, cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weight precision")


def _add_models(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list the named models and whether each works offline")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="turn an official img2img-turbo .pkl into our format")
    p.add_argument("--input", type=_path, required=True, help="the official .pkl file")
    p.add_argument("--output", type=_path, required=True, help="a new folder for config.json + model.safetensors")
    p.add_argument("--name", help="the named model it is, to record its default prompt/direction/r")
    p.add_argument("--base-model", default=None, help="backbone it was trained on (default stabilityai/sd-turbo)")


def _add_config_flags(p: argparse.ArgumentParser, config_class, optional: tuple[str, ...] = ()) -> None:
    """One flag per field of a training config dataclass (``--max-steps`` for ``max_steps``); None = the default.

    The help text is the field's description in the config's docstring (``option_help``) and its default.
    """
    from dataclasses import MISSING, fields

    from .training.options import option_help

    descriptions = option_help(config_class)
    for f in fields(config_class):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        text = descriptions[f.name].replace("%", "%%")  # argparse formats help with %
        if f.default not in (MISSING, None):
            text += f" (default: {f.default!r})" if isinstance(f.default, str) else f" (default: {f.default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            required = f.default is MISSING and f.name not in optional
            p.add_argument(flag, type=kind, default=None, required=required, help=text)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .training.options import PRESETS, PairedTrainConfig, UnpairedTrainConfig

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    p = train.add_parser("paired", help="pix2pix-Turbo on paired images (train_A/, train_B/, train_prompts.json)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe; other options override it")
    u = train.add_parser(
        "unpaired", help="CycleGAN-Turbo on two unpaired folders (train_A/, train_B/, fixed_prompt_a/b.txt)"
    )
    for parser in (p, u):
        parser.add_argument(
            "--resume", nargs="?", const="latest", metavar="latest|PATH",
            help="continue from the newest checkpoint in --output-dir (or from the checkpoint folder PATH)",
        )  # fmt: skip
        parser.add_argument("--stop-at", type=_step, help="stop at this step (resume later with --resume)")
    _add_config_flags(p, PairedTrainConfig, optional=("dataset",))  # a preset can generate its data set
    _add_config_flags(u, UnpairedTrainConfig)


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="generate a data set").add_subparsers(dest="kind", required=True)
    p = data.add_parser("circles", help="paired outlines -> filled shapes with captions (the demo model's data)")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--n", type=int, default=1000, help="number of pairs (10%% go to the test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")


def _add_eval_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-demo", help="measure a circles model on held-out samples (IoU, colour errors)")
    p.add_argument("--model", default="demo-circles")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--json", help="also write the numbers to this file; -: print them instead")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a folder of outputs against references (L2, LPIPS, CLIP, FID, DINO)")
    p.add_argument("--outputs", type=_path, required=True, help="folder of generated images")
    p.add_argument(
        "--references", type=_path, required=True, help="folder of real images, matched to outputs by file name"
    )
    p.add_argument(
        "--prompts", type=_path, help="JSON file: file name -> caption; adds the CLIP image-caption similarity"
    )
    p.add_argument("--inputs", type=_path, help="folder of the inputs the outputs came from (for --dino-structure)")
    p.add_argument("--dino-structure", action="store_true", help="DINO ViT-B/8 structure distance to the inputs")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True, help="clean-fid FID (default on)")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True, help="LPIPS-VGG (default on)")
    p.add_argument("--unpaired", action="store_true", help="folders as sets: no name matching, no L2/LPIPS")
    p.add_argument("--json", help="also write the scores (and per-image values) to this file; -: print them instead")
    p.add_argument("--device", type=_device, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="images per FID forward pass (default 16)")
    for net, what in (("lpips", "VGG16 trunk .pth"), ("clip", "open_clip ViT-B-32"), ("inception", "FID Inception"),
                      ("dino", "DINO ViT-B/8")):  # fmt: skip
        p.add_argument(f"--{net}-path", help=f"local {what} weights instead of the cache / download")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference speed and memory of the full-size architecture (random weights)")
    p.add_argument(
        "--reference", type=Path,
        help="folder of SD-Turbo configs (default: shared/reference/sd-turbo-architecture here or one level up)",
    )  # fmt: skip
    p.add_argument("--device", type=_device, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--modes", nargs="+", choices=("baseline", "fast"), default=["baseline", "fast"])
    p.add_argument("--precision", choices=DTYPES, help="the fast mode's dtype (default: bf16 where native)")
    _add_compile(p, "torch.compile the fast mode")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case, interleaved (default 3)")
    p.add_argument("--out", type=Path, help="write the report here: OUT.json and OUT.md")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="turbo-i2i", description="One-step image-to-image translation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_translate,
        _add_models,
        _add_convert,
        _add_train,
        _add_data,
        _add_eval_demo,
        _add_eval,
        _add_bench,
        _add_demo,
    ):
        add(sub)
    return parser


def _translate(args: argparse.Namespace) -> int:
    import torch

    from . import preprocess as pre
    from .captions import folder_captions, read_captions
    from .folders import folder_inputs, translate_folder
    from .pipeline import Translator, check_prompt, check_tile_size
    from .video import OUTPUT_CODECS, frames_dir, is_video, translate_video

    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise BadInputError(f"{source} does not exist.")
    if args.batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    # What can be checked without the model is, so a folder is not refused file by file after it loaded.
    if args.prompt is not None:
        check_prompt(args.prompt)
    check_tile_size(args.tile, "--tile")
    pre.check_canny_thresholds(args.canny_low, args.canny_high)
    folder, video = source.is_dir(), source.is_file() and is_video(source)
    if args.resume and not (folder or video):
        raise BadInputError(
            f"--resume continues a video (or a folder, which keeps what it finds anyway); {source} is neither:"
            " leave --resume out."
        )
    if not folder and (target.is_dir() or args.output.endswith(("/", os.sep))):  # "out/": a folder, made if new
        target = target / f"{source.stem}{'.mp4' if video else '.png'}"
    if target.resolve() == source.resolve():  # even with --overwrite: the input is the one copy of the picture
        raise BadInputError(f"--output {target} is the input itself; write the translation somewhere else.")
    if args.prompts is not None and not folder:
        raise BadInputError(
            f"--prompts gives each image of a folder its caption; {source} is not a folder: pass --prompt instead."
        )
    files = folder_inputs(source, target, args.overwrite) if folder else []  # checked before the model loads
    if args.prompts is not None:  # every caption checked before the model loads
        folder_captions(files, source, read_captions(args.prompts), args.prompts, args.prompt)
    _check_writable(target if folder else target.parent, str(target))
    if not folder and target.exists() and not args.overwrite:
        raise BadInputError(f"{target} already exists; pass --overwrite to replace it.")
    endings = OUTPUT_CODECS if video else pre.SAVE_EXTENSIONS
    if not folder and target.suffix.lower() not in endings:  # checked before the model loads
        raise BadInputError(f"Cannot write '{target}': use one of {', '.join(endings)}.")
    translator = Translator.from_pretrained(
        args.model, device=args.device, dtype=getattr(torch, args.dtype), compile=args.compile,
        base_model=args.base_model,
    )  # fmt: skip
    options = dict(
        prompt=args.prompt, direction=args.direction, r=args.r,
        edges=None if args.edges == "none" else args.edges, canny_thresholds=(args.canny_low, args.canny_high),
    )  # fmt: skip
    if video:
        try:
            result = translate_video(
                translator, source, target, seed=0 if args.seed is None else args.seed, batch_size=args.batch_size,
                tile_size=args.tile, resume=args.resume, overwrite=args.overwrite, model=args.model, **options,
            )  # fmt: skip
        except KeyboardInterrupt:
            print(f"the frames written so far are in {frames_dir(target)}; add --resume to continue", file=sys.stderr)
            raise
        width, height = result.size
        print(f"wrote {result.frames} frames ({width}x{height}, {result.fps:g} fps) to {result.output}")
        return 0
    options.update(seed=args.seed, tile_size=args.tile)
    if not folder:
        image = pre.load_image(source, max_pixels=translator.max_pixels)
        pre.save_image(translator(image, **options), target, overwrite=args.overwrite)
        return 0
    result = translate_folder(
        translator, source, target, batch_size=args.batch_size, overwrite=args.overwrite, files=files,
        captions=args.prompts, **options,
    )  # fmt: skip
    if result.skipped:
        logger.warning(
            "kept %d existing output(s) (pass --overwrite to replace them), e.g. %s",
            len(result.skipped), result.skipped[0],
        )  # fmt: skip
    print(
        f"translated {len(result.translated)}, skipped {len(result.skipped)} (already translated),"
        f" failed {len(result.failed)}: {target}"
    )
    if result.failed:
        print(f"error: {len(result.failed)} of {result.inputs} input(s) could not be translated:", file=sys.stderr)
        for line in result.failed:
            print(f"  {line}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    if importlib.util.find_spec("gradio") is None:
        raise TurboI2IError("The demo needs Gradio, which is not installed: pip install 'turbo-i2i[demo]'.")
    from .demo.app import launch_app
    from .registry import check_reference

    check_reference(args.model)  # an unknown model fails here, not later in the browser
    where = f"http://{args.host}:{args.port or 7860}" + ("" if args.port else " (or the next free port)")
    print(f"serving the demo on {where}; Ctrl+C stops it", file=sys.stderr)
    try:
        launch_app(host=args.host, port=args.port, share=args.share, model=args.model, device=args.device,
                   dtype=getattr(torch, args.dtype))  # fmt: skip
    except OSError as error:  # a port in use, an address this machine does not have
        raise BadInputError(f"Cannot serve on {args.host}:{args.port or '7860+'} ({error}).") from error
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import default_reference, markdown_table, run_benchmark, write_report

    reference = args.reference or default_reference()
    if args.repeats < 1 or min(args.sizes) < 8 or min(args.batches) < 1:
        raise BadInputError("--repeats and --batches must be at least 1 and --sizes at least 8.")
    report = run_benchmark(
        reference, device=args.device, sizes=tuple(args.sizes), batches=tuple(args.batches), modes=tuple(args.modes),
        precision=getattr(torch, args.precision) if args.precision else None, compile=args.compile,
        repeats=args.repeats, progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    write_report(args.out, report, markdown_table(report))
    return 0


def _models(_: argparse.Namespace) -> int:
    from .registry import MODELS, availability

    width = max(len(name) for name in MODELS)
    print(f"{'name':<{width}}  offline  description")
    for model in MODELS.values():
        ok, reason = availability(model)
        print(f"{model.name:<{width}}  {'yes' if ok else 'no ':<7}  {model.description} ({reason})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .backbone import BUILTIN_BACKBONES, DEFAULT_BACKBONE
    from .checkpoints import convert_official
    from .registry import MODELS, official_overrides

    if args.name is not None:
        if args.name not in MODELS or MODELS[args.name].file is None:
            official = [m.name for m in MODELS.values() if m.file]
            raise BadInputError(f"Unknown official model {args.name!r}; expected one of {', '.join(official)}.")
        overrides = MODELS[args.name].overrides
    else:  # under its published file name, as translate --model FILE.pkl reads it
        overrides = official_overrides(args.input)
    base_model, backbone_path = args.base_model or DEFAULT_BACKBONE, None
    if base_model not in BUILTIN_BACKBONES and Path(base_model).is_dir():  # the backbone loader's order
        # A model folder may not name a path outside itself (resolve_base_model), and the official files were all
        # trained on SD-Turbo: the config names it, the local copy is read now and passed again when loading.
        base_model, backbone_path = DEFAULT_BACKBONE, args.base_model
    existed = Path(args.output).exists()  # convert_official refuses an existing output before writing
    try:
        out = convert_official(args.input, args.output, base_model, backbone_path, **overrides)
    except OSError as error:
        if Path(args.output).resolve() not in {
            Path(error.filename or "").resolve(),
            *Path(error.filename or "").resolve().parents,
        }:
            raise  # not about the output
        # the output cannot be written (permissions, a file in the way, a full disk)
        if not existed:
            shutil.rmtree(args.output, ignore_errors=True)  # no half-written model folder left behind
        reason = error.strerror or str(error)
        raise BadInputError(f"Cannot write {args.output} ({reason}); pick another --output.") from error
    print(f"wrote {out}")
    if backbone_path is not None:
        print(f"its config names {base_model} as its backbone; to read it from {backbone_path}, pass --base-model")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .training.circles import write_dataset
    from .training.options import PRESETS, PairedTrainConfig
    from .training.paired import PairedTrainer

    if args.task == "unpaired":
        return _train_unpaired(args)
    options = dict(PRESETS[args.preset]) if args.preset else {}
    options.update(
        {f.name: getattr(args, f.name) for f in fields(PairedTrainConfig) if getattr(args, f.name, None) is not None}
    )
    options = _with_saved_options(options, args, PairedTrainConfig)
    circles = options.get("extra", {}).get("circles")
    if "dataset" not in options:
        if not circles:
            raise BadInputError("--dataset is required (a paired folder or a .jsonl manifest).")
        # The preset's data set is generated, so the recipe reproduces from nothing but this command.
        options["dataset"] = str(Path(options["output_dir"]) / "data")
        if not Path(options["dataset"]).is_dir():
            write_dataset(options["dataset"], **circles)
    trainer = PairedTrainer(PairedTrainConfig.from_dict(options))
    return _run_training(trainer, args)


def _train_unpaired(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .training.unpaired import UnpairedTrainConfig, UnpairedTrainer

    given = vars(args)
    options = {f.name: given[f.name] for f in fields(UnpairedTrainConfig) if given.get(f.name) is not None}
    trainer = UnpairedTrainer(UnpairedTrainConfig.from_dict(_with_saved_options(options, args, UnpairedTrainConfig)))
    return _run_training(trainer, args)


def _with_saved_options(options: dict, args: argparse.Namespace, config_class) -> dict:
    """A ``--resume``'s options: those on its command line (and its preset) over the checkpoint's, so the run goes on
    as it was without every option typed again.

    Args:
        options: the options given.
        args: the parsed command line (``resume``).
        config_class: the trainer's config dataclass (the checkpoint's other entries are ignored).

    Returns:
        the options to build the run from.
    """
    from dataclasses import fields

    from .training.loop import saved_options

    if not args.resume or "output_dir" not in options:
        return options
    known = {f.name for f in fields(config_class)}
    saved = saved_options(options["output_dir"], args.resume)
    return {**{k: v for k, v in saved.items() if k in known}, **options}


def _run_training(trainer, args: argparse.Namespace) -> int:
    """Run ``trainer`` (resumed / stopped as asked) and print the last step's values (once under data parallelism)."""
    from .training.loop import format_logs

    logs = trainer.train(resume=args.resume, stop_at=args.stop_at)
    if trainer.accelerator.is_main_process:
        print(format_logs(logs))  # as the log lines (lr=0.00001 was 5e-06, skipped_steps=0.00000)
    return 0


def _data(args: argparse.Namespace) -> int:
    from .training.circles import write_dataset

    counts = write_dataset(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {counts['train']} training and {counts['test']} test pairs to {args.out}")
    return 0


def _eval_demo(args: argparse.Namespace) -> int:
    from .pipeline import Translator
    from .training.circles import evaluate

    _check_new_file(args.json)
    translator = Translator.from_pretrained(args.model)
    scores = evaluate(lambda images, prompts: translator(images, prompt=prompts), n=args.n)
    if args.json == STDOUT:
        _write_json(args.json, scores)
        return 0
    print(
        f"IoU {scores['iou']:.4f}  fill error {scores['fill_error']:.2f}/255 (on the outline"
        f" {scores['fill_error_outline']:.2f}, inside it {scores['fill_error_inside']:.2f}; colour offset"
        f" {scores['fill_colour_offset']:.2f})  background error"
        f" {scores['background_error']:.2f}/255  ({scores['n']} held-out samples)"
    )
    if args.json:
        _write_json(args.json, scores)
    return 0


def _check_new_file(path: str | None) -> None:
    """Refuse, before any work, a --json file that exists (nothing already written is replaced) or that cannot be
    written where it is (found after minutes of scoring, the scores would be lost).

    Args:
        path: the --json value (None: not asked for).

    Raises:
        BadInputError: the name is empty or a folder's, the file (or a link by that name) exists, or its folder
            cannot be written.
    """
    if path is None or path == STDOUT:
        return
    if not path.strip() or path.endswith(("/", os.sep)):
        raise BadInputError(f"--json needs a file name, got {path!r}.")
    try:
        os.lstat(path)  # a broken link by that name too: "x" mode would refuse it after the scoring
    except FileNotFoundError:
        pass
    except OSError as error:  # a name too long, say
        raise BadInputError(f"Cannot write the scores to {path} ({error.strerror}); pick another --json.") from error
    else:
        raise BadInputError(f"{path} already exists; pick another --json (an existing file is never replaced).")
    _check_writable(Path(path).parent, f"the scores to {path}")


def _check_writable(folder: Path, what: str) -> None:
    """Refuse, before any work, a folder that can neither be written nor created: the nearest of it and its parents
    that exists must be a folder this process may write.

    Args:
        folder: where files are to be written.
        what: how the message names what would be written.

    Raises:
        BadInputError: naming the folder in the way.
    """
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInputError(f"Cannot write {what}: {existing} is not a writable folder; pick another place.")


def _write_json(path: str, values: dict) -> None:
    """Write ``values`` as JSON to a new file ``path`` (its folder created), exit 2 where it cannot be written; "-"
    prints it (the command then prints no table, so the output can be piped to a JSON reader)."""
    import json

    if path == STDOUT:
        print(json.dumps(values, indent=2))
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:  # "x": never replace a file that appeared meanwhile
            f.write(json.dumps(values, indent=2) + "\n")
    except OSError as error:
        raise BadInputError(f"Cannot write the scores to {path} ({error.strerror}); pick another --json.") from error


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.metrics import evaluate_folders

    if args.batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.inputs and not args.dino_structure:
        logger.warning("--inputs is only used by --dino-structure; it is ignored")
    _check_new_file(args.json)
    weights = {net: getattr(args, f"{net}_path") for net in ("lpips", "clip", "inception", "dino")}
    report = evaluate_folders(
        args.outputs, args.references, args.prompts, args.inputs, lpips=args.lpips, fid=args.fid,
        dino_structure=args.dino_structure, unpaired=args.unpaired, device=args.device, batch_size=args.batch_size,
        weights={net: path for net, path in weights.items() if path},
    )  # fmt: skip
    if args.json != STDOUT:
        print(report.table())
    if args.json:
        _write_json(args.json, report.to_dict())
    return 0


COMMANDS = {
    "translate": _translate,
    "models": _models,
    "bench": _bench,
    "convert": _convert,
    "train": _train,
    "data": _data,
    "eval-demo": _eval_demo,
    "eval": _eval,
    "demo": _demo,
}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the process exit status by the console script)."""
    args = build_parser().parse_args(argv)
    if args.command in ("translate", "demo", "bench"):
        reuse_freed_memory()  # large activations call after call: reuse their pages (see cpu_memory.py)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader stopped early (`turbo-i2i models | head -3`): nothing is wrong, but every later write would fail
        # again, so what is left of the output goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except TurboI2IError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        resume = "; continue from the last checkpoint with --resume" if args.command == "train" else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
