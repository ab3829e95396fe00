"""Evaluation: clean-mode FID, CLIP score, folder scoring and ``turbo-i2i eval``, on tiny seeded stand-in networks."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from turbo_i2i import preprocess as pre
from turbo_i2i.cli import main
from turbo_i2i.errors import BadInputError, TurboI2IError
from turbo_i2i.evaluation import (
    EvalNetworks,
    clip_score,
    clip_similarities,
    compute_fid,
    evaluate_folders,
    fid_statistics,
    frechet_distance,
    image_features,
    load_inception,
    tiny_dino,
    tiny_inception,
)
from turbo_i2i.evaluation import fid as fid_module
from turbo_i2i.training import pretrained
from turbo_i2i.training.losses import CLIPSimLoss
from turbo_i2i.training.pretrained import tiny_clip, tiny_lpips


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty caches, downloads off, and any attempt to open a connection fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fid_module, "CLEANFID_FOLDER", tmp_path / "cleanfid")

    def no_network(*args, **kwargs):
        raise AssertionError("a loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


@pytest.fixture(scope="module")
def nets():
    return EvalNetworks(lpips=tiny_lpips(), clip=tiny_clip(), inception=tiny_inception(), dino=tiny_dino())


def blobs(n, seed, size=32):
    """Smooth random colour fields in [-1, 1]: one distribution."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def stripes(n, seed, size=32):
    """Black and white vertical stripes of random period: a clearly different distribution."""
    period = 2 + torch.randint(0, 3, (n, 1, 1, 1), generator=torch.Generator().manual_seed(seed))
    wave = torch.sin(torch.arange(size).float().view(1, 1, 1, -1) * torch.pi / period) > 0
    return wave.float().expand(n, 3, size, size) * 1.8 - 0.9


def write(folder, images, names=None, ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:03d}" for i in range(len(images))]
    for name, image in zip(names, pre.tensor_to_pil(images)):
        image.save(folder / f"{name}{ext}")
    return folder


def quantised(images):
    """What the images become once saved as 8-bit PNG and read back, in [-1, 1]."""
    return pre.pil_to_tensor(pre.tensor_to_pil(images), value_range=(-1.0, 1.0))


# ----------------------------------------------------------------------------------------------------------- FID


def test_fid_is_zero_for_a_set_against_itself_and_grows_for_a_different_set():
    net = tiny_inception()
    a, a_again, b = blobs(16, 0), blobs(16, 1), stripes(16, 2)
    same = compute_fid(a, a, net)
    sibling = compute_fid(a, a_again, net)  # another sample of the same distribution
    different = compute_fid(a, b, net)
    assert abs(same) < 1e-9
    assert sibling > 0
    assert different > 20 * sibling
    assert compute_fid(b, a, net) == pytest.approx(different, rel=1e-6)  # symmetric


def test_fid_features_match_clean_fids_own_clean_mode_folder_features(tmp_path):
    """Our file handling + clean-fid's resize and network give exactly clean-fid's features of a folder."""
    import cleanfid.fid

    net = tiny_inception()
    folder = write(tmp_path / "a", torch.cat([blobs(3, 0), stripes(2, 1)]))
    write(folder, blobs(2, 2, size=48)[:, :, :40], names=["x0", "x1"])  # another size, not square
    write(folder / "sub", stripes(2, 3), names=["s0", "s1"])  # clean-fid reads sub-folders too (we did not)
    theirs = cleanfid.fid.get_folder_features(
        str(folder), net, num_workers=0, batch_size=4, device=torch.device("cpu"), mode="clean", verbose=False
    )
    ours = image_features(folder, net, batch_size=3)
    assert ours.shape == theirs.shape == (9, 8)
    ours, theirs = (f[np.lexsort(f.T[::-1])] for f in (ours, theirs))  # the path orders may differ, the sets not
    assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_fid_of_tensors_equals_fid_of_their_saved_pngs_and_accepts_cached_statistics(tmp_path):
    net = tiny_inception()
    outputs, references = blobs(10, 0), stripes(10, 1)
    folder = write(tmp_path / "refs", references)
    from_tensors = compute_fid(outputs, references, net)
    assert compute_fid(write(tmp_path / "outs", outputs), folder, net) == pytest.approx(from_tensors, rel=1e-9)
    stats = fid_statistics(folder, net, batch_size=3)  # batching does not change the statistics
    assert stats.n == 10 and stats.sigma.shape == (8, 8)
    assert compute_fid(outputs, stats, net) == pytest.approx(from_tensors, rel=1e-6)
    # Lists of differently sized tensors work too (each image is resized to 299 on its own).
    mixed = [outputs[0], torch.nn.functional.interpolate(outputs[1:2], size=48)[0], *outputs[2:]]
    assert compute_fid(mixed, stats, net) > 0


def test_frechet_distance_matches_the_closed_form():
    net = tiny_inception()
    a, b = fid_statistics(blobs(12, 0), net), fid_statistics(stripes(12, 1), net)
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of the (real, non-negative) eigenvalues of S_a S_b.
    eigenvalues = np.linalg.eigvals(a.sigma @ b.sigma).real.clip(min=0)
    expected = ((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(eigenvalues).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_fid_needs_two_images_and_readable_ones(tmp_path):
    net = tiny_inception()
    with pytest.raises(BadInputError, match="at least 2 images"):
        compute_fid(blobs(1, 0), blobs(4, 1), net)
    folder = write(tmp_path / "x", blobs(3, 0))
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="broken.png"):
        compute_fid(folder, blobs(4, 1), net)
    with pytest.raises(BadInputError, match="does not exist"):
        compute_fid(tmp_path / "missing", blobs(4, 1), net)


def test_load_inception_offline_is_one_paragraph_saying_how_to_provide_it(offline):
    with pytest.raises(TurboI2IError) as error:
        load_inception()
    message = str(error.value)
    assert error.value.exit_code == 1 and not isinstance(error.value, BadInputError)
    assert "\n" not in message
    cache = offline / "torch" / "hub" / "checkpoints" / "inception-2015-12-05.pt"
    for text in (str(cache), fid_module.INCEPTION_URL, "path=", "HF_HUB_OFFLINE"):
        assert text in message
    # the library's paragraph names no command's options: each front end adds its own (eval's, train's)
    assert "--" not in message and "tiny_inception" not in message


class _ScriptedInception(torch.nn.Module):
    """Shaped like the TorchScript Inception file: a ``layers`` module mapping [-1, 1] images to 2048 features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(3, 2048, 1))

    def forward(self, x):
        return self.layers(x)


def test_load_inception_runs_a_cached_file_the_clean_fid_way(offline):
    cache = offline / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    scripted = torch.jit.script(_ScriptedInception())
    scripted.save(str(cache / "inception-2015-12-05.pt"))
    net = load_inception()
    x = torch.rand(2, 3, 299, 299) * 255
    expected = scripted.layers((x - 128) / 128).view(2, 2048)  # clean-fid scales [0, 255] to [-1, 1]
    assert torch.allclose(net(x), expected, atol=1e-5)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    (offline / "junk.pt").write_bytes(b"junk")
    with pytest.raises(BadInputError, match="unreadable"):  # a damaged file: bad input, as damaged model files are
        load_inception(path=offline / "junk.pt")
    with pytest.raises(BadInputError, match="does not exist"):
        load_inception(path=offline / "nothing.pt")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file to another user needs root")
def test_an_inception_file_another_user_left_in_the_shared_tmp_is_not_loaded(offline):
    # clean-fid's /tmp copy is found for convenience; one planted there by someone else would be run as code
    shared = fid_module.CLEANFID_FOLDER
    shared.mkdir()
    torch.jit.script(_ScriptedInception()).save(str(shared / "inception-2015-12-05.pt"))
    assert isinstance(load_inception(), torch.nn.Module)  # this user's own copy is used
    os.chown(shared / "inception-2015-12-05.pt", 12345, 12345)
    with pytest.raises(TurboI2IError, match="not on disk and offline"):
        load_inception()
    assert isinstance(load_inception(path=shared / "inception-2015-12-05.pt"), torch.nn.Module)  # named: the user's


# ---------------------------------------------------------------------------------------------------------- CLIP


def test_clip_score_is_one_minus_the_training_loss_per_image_and_overall():
    loss = CLIPSimLoss(*tiny_clip())
    images = blobs(4, 0, size=64)
    captions = ["a red circle", "a blue square", "a red circle", "night street"]
    sims = clip_similarities(images, captions, loss)
    assert sims.shape == (4,) and bool(((sims >= -1) & (sims <= 1)).all())
    assert float(sims.mean()) == pytest.approx(1 - float(loss(images, captions)), abs=1e-6)
    assert float(sims[0]) == pytest.approx(1 - float(loss(images[:1], captions[:1])), abs=1e-6)
    assert clip_score(images, captions, loss, batch_size=3) == pytest.approx(float(sims.mean()), abs=1e-6)
    assert clip_score(list(images), captions, loss) == pytest.approx(float(sims.mean()), abs=1e-6)
    other = clip_similarities(images, "night street", loss)
    assert not torch.allclose(other[:3], sims[:3])  # the caption matters
    with pytest.raises(BadInputError, match="4 images but 2 captions"):
        clip_score(images, captions[:2], loss)


# ------------------------------------------------------------------------------------------------------ folders


@pytest.fixture
def folders(tmp_path):
    """references/000-005.png, outputs = references + noise (000-005 and an extra 'orphan'), inputs, prompts."""
    references = blobs(6, 0)
    noise = torch.randn(references.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    outputs = (references + noise).clamp(-1, 1)
    root = tmp_path / "eval"
    write(root / "references", references)
    write(root / "outputs", outputs)
    write(root / "outputs", blobs(1, 9), names=["orphan"])
    write(root / "inputs", stripes(6, 4))
    prompts = {f"{i:03d}.png": "a red circle on a blue background" for i in range(6)}
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root, quantised(outputs), quantised(references)


def test_evaluate_folders_scores_matched_pairs_and_reports_the_rest(folders, nets):
    root, outputs, references = folders
    report = evaluate_folders(
        root / "outputs", root / "references", root / "prompts.json", root / "inputs",
        dino_structure=True, networks=nets,
    )  # fmt: skip
    assert report.unmatched["outputs"] == ["orphan.png"] and report.unmatched["references"] == []
    assert report.counts == {"l2": 6, "lpips": 6, "clip_sim": 6, "fid": 6, "dino_structure": 6}
    assert report.metrics["l2"] == pytest.approx(float(((outputs - references) ** 2).mean()), rel=1e-5)
    lpips = float(nets.lpips(outputs, references).mean())
    assert report.metrics["lpips"] == pytest.approx(lpips, rel=1e-4)
    assert report.metrics["fid"] == pytest.approx(compute_fid(outputs, references, nets.inception), rel=1e-6)
    clip = CLIPSimLoss(*nets.clip)
    assert report.metrics["clip_sim"] == pytest.approx(
        1 - float(clip(outputs, "a red circle on a blue background")), abs=1e-6
    )
    assert report.metrics["dino_structure"] > 0.01  # stripes vs colour fields: a different layout
    assert set(report.per_image) == {f"{i:03d}.png" for i in range(6)}
    table = report.table()
    for name in ("l2", "lpips", "clip_sim", "fid", "dino_structure", "orphan.png"):
        assert name in table


def test_evaluate_folders_of_identical_images_scores_zero(tmp_path, nets):
    write(tmp_path / "a", blobs(5, 0))
    write(tmp_path / "b", blobs(5, 0), ext=".bmp")  # matched by name without extension; BMP is lossless
    report = evaluate_folders(tmp_path / "a", tmp_path / "b", networks=nets)
    assert report.metrics["l2"] == 0 and report.metrics["lpips"] == 0
    assert abs(report.metrics["fid"]) < 1e-9
    assert "clip_sim" not in report.metrics and "dino_structure" not in report.metrics


def test_evaluate_folders_matches_files_in_sub_folders_by_their_path_as_translate_writes_them(tmp_path, nets):
    # translate mirrors an input folder's sub-folders; eval used to score only the top level, silently.
    write(tmp_path / "refs" / "day", blobs(3, 0))
    write(tmp_path / "refs" / "night", blobs(3, 1))
    # an output folder inside the references is not read as references (they would be unmatched ones)
    write(tmp_path / "refs" / "night" / "out" / "day", blobs(3, 0))
    write(tmp_path / "refs" / "night" / "out" / "night", blobs(3, 1))
    write(tmp_path / "refs" / "night" / "out" / "night", blobs(1, 7), names=["extra"], ext=".tif")
    write(tmp_path / "refs" / "run1", blobs(2, 9))  # no output is there: not searched (it would join FID's set)
    report = evaluate_folders(tmp_path / "refs" / "night" / "out", tmp_path / "refs", fid=False, networks=nets)
    # day/000 pairs with day/000, not with night/000: the same names in two sub-folders are two files
    assert report.metrics["l2"] == 0 and report.counts["l2"] == 6
    assert set(report.per_image) == {f"{d}/{i:03d}.png" for d in ("day", "night") for i in range(3)}
    assert report.unmatched == {"outputs": ["night/extra.tif"], "references": []}
    (tmp_path / "prompts.json").write_text(json.dumps({"000.png": "a caption by bare name"}))
    with pytest.raises(BadInputError, match=r"day/000.png has no caption in .*\(keys are paths inside the folder"):
        evaluate_folders(tmp_path / "refs" / "night" / "out", tmp_path / "refs", tmp_path / "prompts.json", fid=False,
                         networks=nets)  # fmt: skip


def test_evaluate_folders_refuses_images_too_small_for_lpips_before_loading_it(tmp_path, nets):
    write(tmp_path / "a", blobs(2, 0, size=8))
    write(tmp_path / "b", blobs(2, 0, size=8))
    with pytest.raises(BadInputError, match=r"000.png is 8x8.*LPIPS needs at least 16.*--no-lpips") as info:
        evaluate_folders(tmp_path / "a", tmp_path / "b", fid=False, networks=EvalNetworks())  # nothing loaded
    assert "001.png is 8x8" in str(info.value)
    report = evaluate_folders(tmp_path / "a", tmp_path / "b", lpips=False, fid=False, networks=nets)
    assert report.metrics == {"l2": 0.0}


def test_inputs_too_elongated_for_the_dino_distance_are_refused_before_it_runs(tmp_path):
    # an 8 x 512 strip would become 50,000 tokens: minutes and tens of GB of attention
    for folder in ("in", "out", "ref"):
        write(tmp_path / folder, blobs(1, 0, size=(32, 160)), names=["wide"])
    with pytest.raises(BadInputError, match=r"wide.png is 160x32: the DINO structure distance takes images up to 4"):
        evaluate_folders(
            tmp_path / "out", tmp_path / "ref", inputs=tmp_path / "in", dino_structure=True, fid=False,
            networks=EvalNetworks(),  # nothing is loaded before the refusal
        )  # fmt: skip


def test_evaluate_folders_unpaired_compares_sets(tmp_path, nets):
    write(tmp_path / "day", blobs(4, 0), names=list("abcd"))
    write(tmp_path / "night", stripes(5, 1), names=list("vwxyz"))
    write(tmp_path / "out", blobs(4, 2), names=list("abcd"))
    report = evaluate_folders(
        tmp_path / "out", tmp_path / "night", inputs=tmp_path / "day", dino_structure=True, unpaired=True,
        networks=nets,
    )  # fmt: skip
    assert set(report.metrics) == {"fid", "dino_structure"}
    assert report.counts == {"fid": 4, "dino_structure": 4}
    assert report.metrics["fid"] == pytest.approx(
        compute_fid(tmp_path / "out", tmp_path / "night", nets.inception), rel=1e-9
    )


def test_unpaired_references_are_taken_whole_and_paired_ones_named_when_none_is_beside_the_outputs(tmp_path, nets):
    # outputs in a sub-folder (translate mirrored the input tree), the real night images flat: as sets, they compare
    write(tmp_path / "night", stripes(5, 1), names=list("vwxyz"))
    write(tmp_path / "out" / "day", blobs(4, 2), names=list("abcd"))
    report = evaluate_folders(tmp_path / "out", tmp_path / "night", lpips=False, unpaired=True, networks=nets)
    assert report.metrics["fid"] == pytest.approx(
        compute_fid(tmp_path / "out" / "day", tmp_path / "night", nets.inception), rel=1e-9
    )
    # --inputs inside the references folder (my_data/test_A with my_data as references) are not references
    write(tmp_path / "night" / "test_A", blobs(4, 4), names=list("abcd"))
    report = evaluate_folders(tmp_path / "out" / "day", tmp_path / "night", inputs=tmp_path / "night" / "test_A",
                              dino_structure=True, lpips=False, unpaired=True, networks=nets)  # fmt: skip
    real_nights = [tmp_path / "night" / f"{name}.png" for name in "vwxyz"]
    assert report.metrics["fid"] == pytest.approx(compute_fid(tmp_path / "out" / "day", real_nights, nets.inception))
    # --inputs that are the references folder itself stay references (skipping them left no reference at all)
    same = write(tmp_path / "same", blobs(4, 5), names=list("abcd"))
    report = evaluate_folders(tmp_path / "out" / "day", same, inputs=same, dino_structure=True, lpips=False,
                              unpaired=True, networks=nets)  # fmt: skip
    assert report.metrics["fid"] == pytest.approx(compute_fid(tmp_path / "out" / "day", same, nets.inception))


def test_evaluate_folders_lists_every_problem_before_loading_any_network(folders, offline):
    root, _, _ = folders
    (root / "outputs" / "003.png").write_bytes(b"truncated")
    pre.tensor_to_pil(blobs(1, 0, size=16))[0].save(root / "outputs" / "004.png")  # wrong size
    (root / "prompts.json").write_text(json.dumps({"000.png": "a caption", "001": ""}))
    with pytest.raises(BadInputError) as error:  # offline and no networks given: validation comes first
        evaluate_folders(root / "outputs", root / "references", root / "prompts.json")
    message = str(error.value)
    assert message.startswith("7 problems with the evaluation files:")
    assert "003.png' cannot be decoded" in message
    assert "004.png is 16x16 but" in message
    assert "001.png has a caption that is not a non-empty string" in message
    assert "002.png has no caption" in message


def test_evaluate_folders_bad_input_messages(tmp_path, nets):
    write(tmp_path / "a", blobs(3, 0), names=["x", "y", "z"])
    write(tmp_path / "b", blobs(3, 0), names=["p", "q", "r"])
    with pytest.raises(BadInputError, match="does not exist"):
        evaluate_folders(tmp_path / "missing", tmp_path / "b", networks=nets)
    with pytest.raises(BadInputError, match="No file in .* has a partner of the same name.*--unpaired"):
        evaluate_folders(tmp_path / "a", tmp_path / "b", networks=nets)
    with pytest.raises(BadInputError, match="pass the inputs folder"):
        evaluate_folders(tmp_path / "a", tmp_path / "a", dino_structure=True, networks=nets)
    with pytest.raises(BadInputError, match="are the same folder"):  # every score would be perfect
        evaluate_folders(tmp_path / "a", tmp_path / "a" / ".", networks=nets)
    for bad in (0, 1.5):  # the command line refused these; from Python they were taken
        with pytest.raises(BadInputError, match="batch_size must be a whole number"):
            evaluate_folders(tmp_path / "a", tmp_path / "b", networks=nets, batch_size=bad)
    with pytest.raises(BadInputError, match="--outputs and --inputs are the same folder"):  # was "holds no images"
        evaluate_folders(tmp_path / "a", tmp_path / "b", inputs=tmp_path / "a", dino_structure=True, networks=nets)
    write(tmp_path / "a", blobs(1, 0), names=["x"], ext=".jpg")
    write(tmp_path / "c", blobs(3, 0), names=["x", "y", "z"])
    with pytest.raises(BadInputError, match="share the name 'x'"):
        evaluate_folders(tmp_path / "a", tmp_path / "c", networks=nets)
    with pytest.raises(BadInputError, match="Prompts file .* is a folder"):
        evaluate_folders(tmp_path / "c", tmp_path / "a", prompts=tmp_path, networks=nets)


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_eval_prints_the_table_and_writes_json(folders, nets, monkeypatch, capsys):
    root, _, _ = folders
    seen = {}

    def fake(name, net):
        def load(path=None, **kwargs):
            seen[name] = path
            return net

        return load

    # The CLI loads the real networks; here the loaders hand out the tiny stand-ins and record the paths given.
    monkeypatch.setattr(pretrained, "load_lpips", fake("lpips", nets.lpips))
    monkeypatch.setattr(pretrained, "load_clip", fake("clip", nets.clip))
    monkeypatch.setattr(fid_module, "load_inception", fake("inception", nets.inception))
    monkeypatch.setattr("turbo_i2i.evaluation.dino_structure.load_dino", fake("dino", nets.dino))
    out = root / "scores" / "eval.json"
    code = main([
        "eval", "--outputs", str(root / "outputs"), "--references", str(root / "references"),
        "--prompts", str(root / "prompts.json"), "--inputs", str(root / "inputs"), "--dino-structure",
        "--json", str(out), "--lpips-path", "vgg.pth",
    ])  # fmt: skip
    assert code == 0
    assert seen == {"lpips": "vgg.pth", "clip": None, "inception": None, "dino": None}
    saved = json.loads(out.read_text())
    expected = evaluate_folders(
        root / "outputs", root / "references", root / "prompts.json", root / "inputs",
        dino_structure=True, networks=nets,
    )  # fmt: skip
    assert saved["metrics"] == pytest.approx(expected.metrics)
    assert saved["unmatched"]["outputs"] == ["orphan.png"]
    stdout = capsys.readouterr().out
    assert stdout.startswith("metric") and f"{expected.metrics['fid']:.5f}" in stdout

    l2_only = ["eval", "--outputs", str(root / "outputs"), "--references", str(root / "references"), "--no-fid",
               "--no-lpips"]  # fmt: skip
    assert main([*l2_only, "--json", str(out.with_name("l2.json"))]) == 0
    assert set(json.loads(out.with_name("l2.json").read_text())["metrics"]) == {"l2"}
    capsys.readouterr()
    monkeypatch.chdir(root)
    assert main([*l2_only, "--json", "-"]) == 0  # standard output, JSON only (it wrote a file named "-")
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == json.loads(out.with_name("l2.json").read_text())["metrics"]
    assert not (root / "-").exists()
    before = out.read_text()
    for taken in (out, root):  # a scores file, a folder: never replaced
        assert main([*l2_only, "--json", str(taken)]) == 2
        assert "already exists; pick another --json" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*l2_only, "--json", str(out / "x.json")]) == 2  # under a file
    assert "Cannot write the scores to" in capsys.readouterr().err


def test_cli_eval_bad_input_exits_2_with_one_message(folders, offline, capsys):
    root, _, _ = folders
    code = main(["eval", "--outputs", str(root / "nope"), "--references", str(root / "references")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Folder") and "does not exist" in err and "Traceback" not in err
    code = main(["eval", "--outputs", str(root / "outputs"), "--references", str(root / "inputs"), "--unpaired",
                 "--dino-structure"])  # fmt: skip
    assert code == 2 and "pass the inputs folder" in capsys.readouterr().err
    assert main(["eval", "--outputs", str(root), "--references", str(root), "--batch-size", "0"]) == 2
    # a --json that cannot be written is found before the scoring (offline here: loading LPIPS would exit 1)
    args = ["eval", "--outputs", str(root / "outputs"), "--references", str(root / "references"), "--json"]
    assert main([*args, str(root / "prompts.json" / "scores.json")]) == 2
    assert "Cannot write the scores to" in capsys.readouterr().err
    for bad in ("", str(root / "results") + "/"):  # the second failed after the scoring ("Is a directory")
        assert main([*args, bad]) == 2 and "--json needs a file name" in capsys.readouterr().err
    (root / "link.json").symlink_to(root / "gone.json")  # a broken link by that name: refused after the scoring
    assert main([*args, str(root / "link.json")]) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, str(root / ("x" * 300 + ".json"))]) == 2  # was an OSError traceback
    assert "File name too long" in capsys.readouterr().err


def test_cli_eval_offline_without_weights_exits_1_naming_what_is_missing(folders, offline, capsys):
    root, _, _ = folders
    args = ["eval", "--outputs", str(root / "outputs"), "--references", str(root / "references")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vgg16-397923af.pth" in err and "--lpips-path FILE" in err and "--no-lpips" in err
    assert main([*args, "--no-lpips"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inception-2015-12-05.pt" in err and "--inception-path" in err


def test_a_caption_table_keyed_by_the_inputs_names_serves_translate_and_eval(tmp_path):
    # inputs .jpg, outputs and references .png: translate --prompts found "0001.jpg", eval --prompts refused it
    from turbo_i2i.captions import CaptionTable
    from turbo_i2i.evaluation.metrics import _plan

    write(tmp_path / "outputs" / "day", blobs(2, 0))
    write(tmp_path / "references" / "day", blobs(2, 1))
    prompts = {"./day/000.jpg": "a red circle", "day/001.webp": "a blue square"}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    plan = _plan(tmp_path / "outputs", tmp_path / "references", tmp_path / "prompts.json", None,
                 lpips=False, fid=False, unpaired=False)  # fmt: skip
    assert plan.captions == {"day/000": "a red circle", "day/001": "a blue square"}
    table = CaptionTable({"a.png": "exact", "a": "stem", "b.jpg": "other ending", "c/d.png": "deep"})
    assert table.find(["a.png"]) == "exact" and table.find(["a.jpg"]) == "stem"
    assert table.find(["b.png"]) == "other ending" and table.find(["x.png", "c/d.jpg"]) == "deep"
    assert table.find(["d.png"]) is None  # a path, not a bare name found anywhere
