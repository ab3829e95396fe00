"""Score a folder of outputs against a folder of references (and their inputs): what ``turbo-i2i eval`` runs.

Files are matched by their path inside the folder without extension (``0001.png`` in the outputs pairs with
``0001.jpg`` in the references, ``night/0001.png`` with ``night/0001.jpg``: sub-folders are searched, as ``turbo-i2i
translate`` mirrors them); unmatched files are reported, not scored. Every file is checked before any network is
loaded, so a bad folder fails in a second with one message that lists every problem. Metrics (lower is better
unless noted):

- ``l2``: mean squared pixel error in [-1, 1] units, per pair, as the paired trainer logs it;
- ``lpips``: LPIPS (VGG) distance, per pair;
- ``clip_sim``: CLIP ViT-B/32 image-caption cosine similarity (higher is better), when captions are given;
- ``fid``: clean-fid FID of the outputs against the references (the matched ones; all of both folders when
  ``unpaired``);
- ``dino_structure``: DINO ViT-B/8 self-similarity distance of each output to its input, when asked.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import preprocess as pre
from ..captions import CaptionTable, read_captions
from ..devices import check_batch_size
from ..errors import BadInputError, format_problems, with_hint
from .dino_structure import check_aspect_ratio

METRICS = ("l2", "lpips", "clip_sim", "fid", "dino_structure")
HIGHER_IS_BETTER = {"clip_sim"}
WEIGHT_KEYS = ("lpips", "clip", "inception", "dino")
LPIPS_MIN_SIDE = 16


@dataclasses.dataclass
class EvalNetworks:
    """The pretrained networks the metrics are measured with; None entries are loaded when a metric needs them.

    Args:
        lpips: an LPIPS network, ``(x, y) -> (N, 1, 1, 1)`` (``load_lpips()`` / ``tiny_lpips()``).
        clip: ``(open_clip model, tokenizer)`` (``load_clip()`` / ``tiny_clip()``).
        inception: the FID feature network (``load_inception()`` / ``tiny_inception()``).
        dino: the ViT of the structure distance (``load_dino()`` / ``tiny_dino()``).
    """

    lpips: nn.Module | None = None
    clip: tuple | None = None
    inception: nn.Module | None = None
    dino: nn.Module | None = None


# What ``turbo-i2i eval`` adds to a loader's missing-weights paragraph (which names Python's ``path=``).
EVAL_HINTS = {
    "lpips": "With turbo-i2i eval, --lpips-path FILE passes a local copy; --no-lpips skips LPIPS.",
    "clip": "With turbo-i2i eval, --clip-path FILE passes a local copy; leaving out --prompts skips the CLIP score.",
    "inception": "With turbo-i2i eval, --inception-path FILE passes a local copy; --no-fid skips FID.",
    "dino": "With turbo-i2i eval, --dino-path FILE passes a local copy; leaving out --dino-structure skips it.",
}


def load_networks(
    needed: Sequence[str],
    given: EvalNetworks | None = None,
    weights: dict[str, str | os.PathLike] | None = None,
    device: torch.device | str | None = None,
    hints: dict[str, str] | None = None,
) -> EvalNetworks:
    """The networks for some metrics: the given ones, the rest loaded by the standard loaders.

    Args:
        needed: metric names from ``METRICS``; "l2" needs no network.
        given: networks to use as they are (moved to ``device`` when one is given).
        weights: local weight files by network: "lpips", "clip", "inception", "dino" (else caches / downloads).
        device: where the networks run (CPU when None).
        hints: by network, a sentence added to its missing-weights message (a front end's options,
            ``EVAL_HINTS`` for ``turbo-i2i eval``).

    Returns:
        an ``EvalNetworks`` with every network the metrics need.

    Raises:
        TurboI2IError: a pretrained network can neither be found on disk nor downloaded (one paragraph each).
        BadInputError: a weights file that does not exist, or an unknown key in ``weights``.
    """
    from ..training.pretrained import load_clip, load_lpips
    from .dino_structure import load_dino
    from .fid import load_inception

    weights = dict(weights or {})
    unknown = set(weights) - set(WEIGHT_KEYS)
    if unknown:
        raise BadInputError(f"Unknown network(s) {sorted(unknown)} in weights; expected {', '.join(WEIGHT_KEYS)}.")
    nets = dataclasses.replace(given) if given is not None else EvalNetworks()
    hints = hints or {}
    if "lpips" in needed and nets.lpips is None:
        with with_hint(hints.get("lpips")):
            nets.lpips = load_lpips(path=weights.get("lpips"))
    if "clip_sim" in needed and nets.clip is None:
        with with_hint(hints.get("clip")):
            nets.clip = load_clip(path=weights.get("clip"))
    if "fid" in needed and nets.inception is None:
        with with_hint(hints.get("inception")):
            nets.inception = load_inception(path=weights.get("inception"))
    if "dino_structure" in needed and nets.dino is None:
        with with_hint(hints.get("dino")):
            nets.dino = load_dino(path=weights.get("dino"))
    if device is not None:
        for net in (nets.lpips, nets.inception, nets.dino, nets.clip[0] if nets.clip else None):
            if net is not None:
                net.to(device)
    return nets


@dataclasses.dataclass
class EvalReport:
    """What ``evaluate_folders`` measured.

    Args:
        metrics: metric name -> mean value over the images it was computed on.
        counts: metric name -> how many images (pairs) it was computed on.
        per_image: output file (path inside ``outputs``) -> {metric: value} for the per-image metrics.
        unmatched: "outputs" / "references" (paired: no partner of the same name) and "outputs without input"
            (with inputs: scored outputs the structure distance skipped) -> paths inside the folders.
        folders: "outputs" / "references" / "inputs" -> the folders as given.
    """

    metrics: dict[str, float]
    counts: dict[str, int]
    per_image: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    unmatched: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    folders: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {
            "metrics": self.metrics,
            "counts": self.counts,
            "folders": self.folders,
            "unmatched": self.unmatched,
            "per_image": self.per_image,
        }

    def table(self) -> str:
        """A plain-text table: metric, value, better direction, number of images; then the unmatched counts."""
        lines = [f"{'metric':<16}{'value':>12}  {'better':<8}{'images':>8}"]
        for name in METRICS:
            if name in self.metrics:
                better = "higher" if name in HIGHER_IS_BETTER else "lower"
                lines.append(f"{name:<16}{self.metrics[name]:>12.5f}  {better:<8}{self.counts[name]:>8}")
        for side, names in self.unmatched.items():
            if names:
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                lines.append(f"not scored: {len(names)} file(s) in {side} without a partner ({shown})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- matching


def _by_key(
    folder: Path, problems: list[str], skip: Sequence[Path] = (), within: set[str] | None = None
) -> dict[str, Path]:
    """The images in ``folder`` and its sub-folders by key: the path inside ``folder`` without extension ("night/0001"
    for night/0001.png), the way ``turbo-i2i translate`` names a folder's outputs. Two files sharing a key are a
    problem (which one would be meant?).

    Args:
        folder: the folder.
        problems: where problems are listed.
        skip: folders not to search.
        within: only the files in these sub-folders (paths inside ``folder``, "." for itself); None: all.

    Returns:
        key -> file.
    """
    found: dict[str, Path] = {}
    for path in pre.list_images(folder, recursive=True, skip=skip):
        key = path.relative_to(folder).with_suffix("").as_posix()
        if within is not None and Path(key).parent.as_posix() not in within:
            continue
        if key in found:
            problems.append(f"{found[key]} and {path.name} share the name {key!r}; keep one of them")
        else:
            found[key] = path
    return found


def _name(path: Path, folder: Path) -> str:
    """How a file is named in the report: its path inside the folder given."""
    return path.relative_to(folder).as_posix()


@dataclasses.dataclass
class _Plan:
    """What is scored, by output key (path without extension): the outputs, their references and inputs, their
    captions, the FID sets."""

    outputs: dict[str, Path]
    references: dict[str, Path]
    inputs: dict[str, Path]
    captions: dict[str, str]
    fid_sets: tuple[list[Path], list[Path]] | None
    unmatched: dict[str, list[str]]


def _plan(
    outputs: Path,
    references: Path,
    prompts: str | os.PathLike | None,
    inputs: Path | None,
    *,
    lpips: bool,
    fid: bool,
    unpaired: bool,
) -> _Plan:
    """Match the files and check every one of them, raising one listing error when anything is wrong."""
    problems: list[str] = []
    # Neither folder is searched for the other's files (outputs written into a sub-folder of the references, say).
    outs = _by_key(outputs, problems, skip=[references])
    # Paired, references and inputs are looked for in the folders the outputs are in (a tree translate mirrored):
    # other sub-folders may hold anything, an earlier run's outputs say, which would otherwise join the FID reference
    # set. Unpaired, the references are a set of their own (real night images for day->night outputs), taken whole.
    where = {Path(key).parent.as_posix() for key in outs}
    # (--inputs inside the references, my_data/test_A beside my_data/test_B, would join a set taken whole: skipped;
    # the references themselves given as --inputs are still the references)
    inside = unpaired and inputs is not None and inputs.resolve() != references.resolve()
    skip = [outputs, *([inputs] if inside else [])]
    refs = _by_key(references, problems, skip=skip, within=None if unpaired else where)
    unmatched: dict[str, list[str]] = {}
    scored, partners = dict(outs), {}
    if not unpaired:
        scored = {s: p for s, p in outs.items() if s in refs}
        partners = {s: refs[s] for s in scored}
        unmatched["outputs"] = sorted(_name(p, outputs) for s, p in outs.items() if s not in refs)
        unmatched["references"] = sorted(_name(p, references) for s, p in refs.items() if s not in outs)
        if not scored:
            example = (
                f"e.g. {next(iter(outs))!r} vs {next(iter(refs))!r}"
                if refs
                else f"it has no image in the outputs' folders: {', '.join(repr(w) for w in sorted(where))}"
            )
            raise BadInputError(
                f"No file in {outputs} has a partner of the same name in {references} ({example}); outputs are"
                " matched to references by path inside the folder without extension. Pass --unpaired to compare the"
                " two folders as sets (FID only)."
            )
    sources = {}
    if inputs is not None:
        ins = _by_key(inputs, problems, skip=[outputs], within=where)
        sources = {s: ins[s] for s in scored if s in ins}
        unmatched["outputs without input"] = sorted(_name(p, outputs) for s, p in scored.items() if s not in ins)
        if not sources:
            raise BadInputError(
                f"No scored output in {outputs} has an input of the same name in {inputs}; inputs are matched to"
                " outputs by path inside the folder without extension."
            )
    captions: dict[str, str] = {}
    if prompts is not None:
        table = CaptionTable(read_captions(prompts))
        for s, path in scored.items():
            names = [_name(path, outputs)] + ([_name(partners[s], references)] if s in partners else [])
            names += [_name(sources[s], inputs)] if s in sources else []
            caption = table.find(names)
            if not isinstance(caption, str) or not caption.strip():
                why = "no caption" if caption is None else "a caption that is not a non-empty string"
                keys = f" (keys are paths inside the folder: {names[0]!r} or {s!r})" if "/" in s else ""
                problems.append(f"{names[0]} has {why} in {prompts}{keys}")
            else:
                captions[s] = caption
    fid_sets = None
    if fid:
        # Paired: the scored pairs, so every number describes the same images; unpaired: both folders as sets.
        fid_sets = (list(scored.values()), list(partners.values()) if not unpaired else list(refs.values()))
        if min(len(fid_sets[0]), len(fid_sets[1])) < 2:
            problems.append("FID needs at least 2 images on each side; pass --no-fid to skip it")
    sizes: dict[Path, tuple[int, int]] = {}
    to_read = {*scored.values(), *partners.values(), *sources.values(), *(fid_sets[1] if fid_sets else ())}
    for path in sorted(to_read):
        try:
            sizes[path] = pre.load_image(path).size
        except BadInputError as error:
            problems.append(str(error))
    for s, ref in partners.items():
        out = scored[s]
        if out in sizes and ref in sizes and sizes[out] != sizes[ref]:
            problems.append(
                f"{out} is {sizes[out][0]}x{sizes[out][1]} but {ref} is {sizes[ref][0]}x{sizes[ref][1]}; paired"
                " metrics need outputs at the references' size"
            )
        elif lpips and out in sizes and min(sizes[out]) < LPIPS_MIN_SIDE:  # its VGG halves the image four times
            problems.append(
                f"{out} is {sizes[out][0]}x{sizes[out][1]}: LPIPS needs at least {LPIPS_MIN_SIDE} pixels a side;"
                " pass --no-lpips (lpips=False) to score without it."
            )
    for path in sources.values():
        if path in sizes:
            try:
                check_aspect_ratio(*sizes[path], str(path))
            except BadInputError as error:
                problems.append(str(error))
    if problems:
        raise BadInputError(format_problems("with the evaluation files", problems))
    return _Plan(scored, partners, sources, captions, fid_sets, unmatched)


# ------------------------------------------------------------------------------------------------------ scoring


def _tensor(path: Path) -> torch.Tensor:
    return pre.pil_to_tensor([pre.load_image(path)], value_range=(-1.0, 1.0))


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def evaluate_folders(
    outputs: str | os.PathLike,
    references: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    inputs: str | os.PathLike | None = None,
    *,
    lpips: bool = True,
    fid: bool = True,
    dino_structure: bool = False,
    unpaired: bool = False,
    networks: EvalNetworks | None = None,
    weights: dict[str, str | os.PathLike] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 16,
) -> EvalReport:
    """Score generated images against references (``turbo-i2i eval``).

    Args:
        outputs: folder of generated images.
        references: folder of real images; matched to the outputs by path inside the folder without extension
            (looked for in the sub-folders the outputs are in); unpaired, all of it.
        prompts: JSON file mapping file names (an output's or its reference's path inside its folder, with or
            without extension) to captions; given, ``clip_sim`` is computed.
        inputs: folder of the inputs the outputs were translated from (needed by ``dino_structure``).
        lpips: compute LPIPS.
        fid: compute clean-fid FID.
        dino_structure: compute the DINO structure distance of each output to its input.
        unpaired: do not match outputs to references (unpaired translation): only FID, CLIP and DINO, on every
            output.
        networks: networks to use instead of loading the pretrained ones (tests pass tiny stand-ins).
        weights: local weight files by network ("lpips", "clip", "inception", "dino") for the ones loaded here.
        device: where the networks run (CPU when None).
        batch_size: images per forward pass for FID.

    Returns:
        an ``EvalReport`` (``.table()`` to print, ``.to_dict()`` for JSON).

    Raises:
        BadInputError: a missing or empty folder, no matching files, an unreadable image, a missing caption,
            mismatched sizes, an image under 16 pixels a side with ``lpips``, an input more than 4 times longer
            than wide with ``dino_structure`` or that without ``inputs``: one message listing every problem found.
        TurboI2IError: a pretrained network can neither be found on disk nor downloaded.
    """
    from ..training.losses import CLIPSimLoss, LPIPSLoss
    from .clip_score import clip_similarities
    from .dino_structure import DINOStructureDistance
    from .fid import compute_fid

    check_batch_size(batch_size)
    if dino_structure and inputs is None:
        raise BadInputError("The DINO structure distance compares outputs with their inputs; pass the inputs folder.")
    outputs, references = Path(outputs), Path(references)
    if outputs.exists() and outputs.resolve() == references.resolve():  # every score would be perfect, and meaningless
        raise BadInputError(f"--outputs and --references are the same folder ({outputs}); pass the reference images.")
    inputs = Path(inputs) if dino_structure else None
    if inputs is not None and outputs.exists() and outputs.resolve() == inputs.resolve():  # every distance 0
        raise BadInputError(f"--outputs and --inputs are the same folder ({outputs}); pass the outputs' inputs.")
    plan = _plan(outputs, references, prompts, inputs, lpips=lpips, fid=fid, unpaired=unpaired)
    if not (plan.references or plan.captions or fid or dino_structure):
        raise BadInputError(
            "Nothing to compute: unpaired outputs have no per-image reference (L2, LPIPS); ask for FID, the DINO"
            " structure distance (with the inputs) or CLIP similarity (with prompts)."
        )
    needed = ["lpips"] * (lpips and bool(plan.references)) + ["clip_sim"] * bool(plan.captions)
    needed += ["fid"] * fid + ["dino_structure"] * dino_structure
    nets = load_networks(needed, networks, weights, device, EVAL_HINTS)
    lpips_loss = LPIPSLoss(nets.lpips) if "lpips" in needed else None
    clip_loss = CLIPSimLoss(*nets.clip) if "clip_sim" in needed else None
    dino = DINOStructureDistance(nets.dino) if dino_structure else None

    per_image: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for stem, out_path in plan.outputs.items():
            out, scores = _tensor(out_path), {}
            if stem in plan.references:
                ref = _tensor(plan.references[stem])
                scores["l2"] = float(torch.nn.functional.mse_loss(out, ref))
                if lpips_loss is not None:
                    net_device = _device(lpips_loss.net)
                    scores["lpips"] = float(lpips_loss(out.to(net_device), ref.to(net_device)))
            if stem in plan.captions:
                scores["clip_sim"] = float(clip_similarities(out, [plan.captions[stem]], clip_loss)[0])
            if dino is not None and stem in plan.inputs:
                scores["dino_structure"] = float(dino(_tensor(plan.inputs[stem]), out)[0])
            if scores:
                per_image[_name(out_path, outputs)] = scores

    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name in METRICS:
        values = [scores[name] for scores in per_image.values() if name in scores]
        if values:
            metrics[name], counts[name] = sum(values) / len(values), len(values)
    if plan.fid_sets is not None:
        metrics["fid"] = compute_fid(plan.fid_sets[0], plan.fid_sets[1], nets.inception, batch_size)
        counts["fid"] = len(plan.fid_sets[0])
    folders = {"outputs": str(outputs), "references": str(references)}
    if inputs is not None:
        folders["inputs"] = str(inputs)
    return EvalReport(metrics, counts, per_image, plan.unmatched, folders)
