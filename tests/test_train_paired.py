import json
import math
import warnings

import pytest
import torch
from diffusers.models.upsampling import Upsample2D
from PIL import Image
from trainers import (
    WeightCasts,
    autocast_in_backward,
    check_shared_evaluation,
    make_paired_trainer,
    train_three_steps,
    trained_weights,
)

from turbo_i2i.cli import main
from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator
from turbo_i2i.training.circles import write_dataset
from turbo_i2i.training.loop import LOG_FILE
from turbo_i2i.training.options import PRESETS
from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
from turbo_i2i.training.pretrained import tiny_lpips


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "circles"
    write_dataset(folder, n=10, seed=3, size=32)
    return folder


def test_training_lowers_the_loss_on_a_fixed_batch(dataset, tmp_path):
    trainer = make_paired_trainer(dataset, tmp_path, batch_size=9, disc="none", lambda_clipsim=0.0, lambda_lpips=0.0)
    first = trainer.train_step()["loss_g"]
    for _ in range(29):
        last = trainer.train_step()["loss_g"]
    assert last < 0.5 * first, (first, last)


def test_only_trainable_weights_change_and_d_ignores_the_generator_step(dataset, tmp_path):
    trainer = make_paired_trainer(dataset, tmp_path)
    # sub-pixel upsampling in the VAE decoders, the UNet's upsamplers as they are
    assert trainer.upsampler_swaps and not any(isinstance(m, Upsample2D) for m in trainer.unwrapped.vae.modules())
    assert any(isinstance(m, Upsample2D) for m in trainer.unwrapped.unet.modules())
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    d_before = {n: p.detach().clone() for n, p in trainer.discriminator.named_parameters()}
    batch = trainer.batch(0)
    terms = trainer.losses(batch)
    assert "loss_gan" in terms and "loss_clipsim" in terms and "loss_lpips" in terms
    trainer.accelerator.backward(terms["loss_g"])
    trainer.optimizer_g.step()
    assert all(torch.equal(p, d_before[n]) for n, p in trainer.discriminator.named_parameters())
    changed = {n for n, p in trainer.unwrapped.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(trainer.unwrapped.is_trained(n) for n in changed)
    # a whole iteration: D learns from its own loss (its grads from G's GAN term are cleared first)
    trainer.optimizer_g.zero_grad()
    trainer.train_step()
    frozen = [n for n in before if not trainer.unwrapped.is_trained(n)]
    assert all(torch.equal(dict(trainer.unwrapped.named_parameters())[n], before[n]) for n in frozen)
    assert any(not torch.equal(p, d_before[n]) for n, p in trainer.discriminator.named_parameters())


def test_d_steps_on_the_gradient_of_its_own_loss_alone(dataset, tmp_path, monkeypatch):
    """The generator's GAN term leaves gradients on D; D's step must see only those of its own loss. D's loss is
    replaced by one whose gradient is known (its first weight's sum: all ones) and D's gradient is read as its
    optimiser steps (the public implementation summed both)."""
    from turbo_i2i.training import discriminators

    trainer = make_paired_trainer(dataset, tmp_path)
    weight = next(trainer.discriminator.parameters())
    monkeypatch.setattr(discriminators, "discriminator_loss", lambda d, real, fake: weight.sum())
    seen = {}
    clear, step = trainer.optimizer_d.zero_grad, trainer.optimizer_d.step

    def zero_grad(*args, **kwargs):
        seen.setdefault("from_generator", weight.grad is not None and bool(weight.grad.abs().sum() > 0))
        clear(*args, **kwargs)

    def step_d(*args, **kwargs):
        seen["at_step"] = weight.grad.clone()
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer_d, "zero_grad", zero_grad)
    monkeypatch.setattr(trainer.optimizer_d, "step", step_d)
    trainer.train_step()
    assert seen["from_generator"]  # the GAN term did reach D ...
    assert torch.equal(seen["at_step"], torch.ones_like(weight))  # ... and was cleared before D's own backward


def test_gradient_accumulation_equals_the_larger_batch(dataset, tmp_path, one_thread):
    options = dict(disc="none", lambda_clipsim=0.0, max_steps=3, max_grad_norm=0.0)
    big = make_paired_trainer(dataset, tmp_path / "big", batch_size=6, **options)
    accumulated = make_paired_trainer(
        dataset, tmp_path / "acc", batch_size=3, gradient_accumulation_steps=2, **options
    )
    grads = {}
    for name, trainer in (("big", big), ("acc", accumulated)):
        params = trainer.optimizer_g.param_groups[0]["params"]
        # the update itself is Adam's (blind to a gradient's scale): compare the gradients it is given instead
        trainer.optimizer_g.step = lambda params=params, name=name: grads.setdefault(
            name, [p.grad.clone() for p in params]
        )
        logs = trainer.train_step()
        grads[name + "_loss"] = logs["loss_g"]
    assert abs(grads["big_loss"] - grads["acc_loss"]) < 1e-6
    scale = max(float(g.abs().max()) for g in grads["big"])
    assert max(float((a - b).abs().max()) for a, b in zip(grads["big"], grads["acc"])) <= 1e-5 * scale


def test_bf16_mixed_precision_keeps_trainable_weights_fp32_and_learns(dataset, tmp_path):
    trainer = make_paired_trainer(
        dataset, tmp_path, mixed_precision="bf16", batch_size=9, disc="none", lambda_clipsim=0.0, lambda_lpips=0.0
    )
    dtypes = {n: p.dtype for n, p in trainer.unwrapped.named_parameters()}
    assert {dtypes[n] for n in dtypes if trainer.unwrapped.is_trained(n)} == {torch.float32}
    assert {dtypes[n] for n in dtypes if not trainer.unwrapped.is_trained(n)} == {torch.bfloat16}
    convs = [p for p in trainer.unwrapped.parameters() if p.ndim == 4 and p.shape[-1] == 3]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # NHWC: CPU, bf16
    first = trainer.train_step()["loss_g"]
    for _ in range(29):
        last = trainer.train_step()["loss_g"]
    assert last < 0.5 * first, (first, last)
    assert all(p.dtype == torch.float32 for group in trainer.optimizer_g.state.values() for p in group.values()
               if torch.is_tensor(p) and p.ndim > 0)  # fmt: skip


def test_stop_and_resume_equals_straight_run(dataset, tmp_path, one_thread):
    straight = make_paired_trainer(dataset, tmp_path / "a")
    straight.train()
    first = make_paired_trainer(dataset, tmp_path / "b")
    first.train(stop_at=10)
    assert first.step == 10 and not (tmp_path / "b" / "model").exists()
    resumed = make_paired_trainer(dataset, tmp_path / "b")  # a new process would build everything afresh too
    resumed.train(resume=True)
    assert resumed.step == 20
    a, b = straight.unwrapped.trained_state_dict(), resumed.unwrapped.trained_state_dict()
    # Bit-identical (one-thread kernels). A resume that lost any state (data order, LR, optimiser moments, D, a cached
    # caption embedding computed in another batch: 1 float32 ulp, which the GAN at lr 1e-3 amplifies) would not be.
    assert all(torch.equal(a[k], b[k]) for k in a)
    d_a, d_b = straight.discriminator.state_dict(), resumed.discriminator.state_dict()
    assert all(torch.equal(d_a[k], d_b[k]) for k in d_a)


def test_evaluations_clip_sim_is_the_similarity_eval_reports_not_the_loss(dataset, tmp_path):
    """eval_clipsim logged the CLIP loss (1 - cosine: lower is better) under the name `turbo-i2i eval` uses for the
    cosine itself (higher is better)."""
    from turbo_i2i.evaluation import clip_similarities

    trainer = make_paired_trainer(dataset, tmp_path, num_eval=1)
    scores = trainer.evaluate()
    item = trainer.test_data[0]
    with torch.no_grad():
        out = trainer.unwrapped.eval()(item["input"][None], trainer.encode([item["prompt"]])).float()
    expected = float(clip_similarities(out, item["prompt"], trainer.clipsim)[0])
    assert "eval_clipsim" not in scores and scores["eval_clip_sim"] == pytest.approx(expected, abs=1e-5)


def test_fids_reference_set_is_every_test_target_whatever_num_eval(tmp_path):
    """num_eval limits the pairs translated, not FID's references (they were the same num_eval targets)."""
    write_dataset(tmp_path / "data", n=40, seed=3, size=32)  # four test pairs
    seen = {}

    def metrics(direction, inputs, outputs, references):
        seen.update(n=len(outputs), references=references)
        return {}

    trainer = make_paired_trainer(tmp_path / "data", tmp_path / "run", num_eval=2)
    trainer.metrics = metrics
    trainer.evaluate()
    references, targets = seen["references"], [trainer.test_data[i]["target"] for i in range(4)]
    assert seen["n"] == 2 and len(references) == 4 and all(torch.equal(r, t) for r, t in zip(references, targets))
    assert all(torch.equal(r, t) for r, t in zip(references[1:3], targets[1:3]))  # slices too, as lists do
    with pytest.raises(IndexError):
        references[4]


def test_run_logs_every_step_saves_grids_and_keeps_the_newest_complete_checkpoints(dataset, tmp_path):
    write_dataset(tmp_path / "data", n=20, seed=3, size=32)  # two test pairs: FID needs two images per side
    trainer = make_paired_trainer(
        tmp_path / "data", tmp_path, max_steps=6, checkpoint_every=2, eval_every=3, keep_checkpoints=2, num_eval=2
    )
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all("loss_g" in line and "loss_d" in line and "lr" in line for line in lines)
    evaluated = [line for line in lines if "eval_l2" in line]
    assert [line["step"] for line in evaluated] == [3, 6]
    assert all({"eval_lpips", "eval_clip_sim", "eval_fid"} <= set(line) for line in evaluated)
    grid = Image.open(tmp_path / "eval" / "step_0000006.png")
    assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)  # two test pairs, each a row: input | output | target
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    # a crash mid-write leaves a partial folder, never a checkpoint that resume would pick
    (tmp_path / "checkpoints" / ".step_0000008.partial").mkdir()
    (tmp_path / "checkpoints" / "step_0000010").mkdir()  # no trainer_state.json: incomplete
    assert trainer.latest_checkpoint().name == "step_0000006"
    older = make_paired_trainer(dataset, tmp_path / "other", max_steps=6)
    older.train(resume=tmp_path / "checkpoints" / "step_0000004", stop_at=5)  # --resume PATH
    assert older.step == 5


def test_exported_model_gives_the_trainers_outputs(tmp_path):
    write_dataset(tmp_path / "data64", n=10, seed=5, size=64)  # 64 px: the size the Translator runs such inputs at
    trainer = make_paired_trainer(tmp_path / "data64", tmp_path, max_steps=3, disc="none")
    trainer.train()
    translator = Translator.from_pretrained(tmp_path / "model")
    item = trainer.test_data[0]
    with torch.no_grad():
        expected = trainer.unwrapped.eval()(item["input"][None], trainer.encode([item["prompt"]]))
    image = Image.fromarray((item["input"].permute(1, 2, 0) * 255).round().byte().numpy())
    got = translator(image, prompt=item["prompt"])
    expected_image = (expected[0].permute(1, 2, 0) * 127.5 + 127.5).round().clamp(0, 255).byte().numpy()
    assert (torch.tensor(list(got.getdata())).view(64, 64, 3) - torch.from_numpy(expected_image)).abs().max() <= 1


def test_bad_dataset_gives_one_message_and_exit_2(tmp_path, capsys):
    folder = tmp_path / "bad"
    write_dataset(folder, n=6, seed=0, size=32)
    (folder / "train_B" / "000001.png").unlink()
    (folder / "train_A" / "000002.png").write_text("not an image")
    prompts = json.loads((folder / "train_prompts.json").read_text())
    del prompts["000003.png"]
    (folder / "train_prompts.json").write_text(json.dumps(prompts))
    code = main(
        ["train", "paired", "--dataset", str(folder), "--output-dir", str(tmp_path / "run"), "--base-model", "tiny"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "3 problems" in err
    assert "000001.png" in err and "000002.png" in err and "000003.png" in err and "Traceback" not in err


def test_demo_preset_recipe_still_learns(tmp_path):
    """The shipped model's recipe, from scratch, on a fixed batch (from random weights a varied stream of batches
    needs a few hundred steps before the loss moves; a fixed batch shows within tens whether the recipe learns)."""
    options = dict(PRESETS["demo-circles"], output_dir=str(tmp_path), max_steps=50, lr_warmup_steps=0)
    write_dataset(tmp_path / "data", n=10, seed=1, size=64)
    options.update(batch_size=8, eval_every=1000, checkpoint_every=1000)
    trainer = PairedTrainer(PairedTrainConfig(dataset=str(tmp_path / "data"), **options))
    assert trainer.unwrapped.config.train_all and trainer.text_encoder.embeddings.token_embedding.weight.requires_grad
    batch = trainer.batch(0)
    trainer.batch = lambda step: batch
    losses = [trainer.train_step()["loss_g"] for _ in range(50)]
    assert min(losses[-5:]) < 0.75 * losses[0], losses


def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    """Data-parallel training (gloo on the CPU, launched the way Accelerate launches it) is real: both ranks end with
    identical weights, equal to one process with the doubled batch up to float summation order; the log shows the
    whole batch's losses; the evaluation is shared between the processes."""
    dataset = tmp_path / "data"
    write_dataset(dataset, n=10, seed=3, size=32, test_fraction=0.3)  # three test pairs to share
    rank0, rank1 = train_three_steps("paired", dataset, tmp_path / "two", 2, processes=2)
    (single,) = train_three_steps("paired", dataset, tmp_path / "one", 4)
    check_shared_evaluation(rank0, rank1, single)
    trained = [k for k in rank0 if not k.startswith(("gradient.", "own_"))]
    assert all(torch.equal(rank0[k], rank1[k]) for k in trained)
    assert max(float((rank0[k] - single[k]).abs().max()) for k in trained) <= 1e-4
    # the log holds the whole batch's loss: the mean of the processes' own
    logged = [json.loads(line)["loss_g"] for line in (tmp_path / "two" / LOG_FILE).read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(logged), (rank0["own_loss_g"] + rank1["own_loss_g"]) / 2)


def test_fp16_training_scales_the_loss_and_keeps_every_term_finite(dataset, tmp_path):
    """fp16 (frozen weights in fp16, a gradient scaler): the LPIPS term stays finite (it is computed in fp32), and
    the scaler lowers its scale after overflowing gradients, skipping those updates itself, not counted as faults,
    and without PyTorch's warning about a scheduler stepping before its optimiser (the LR follows the step number)."""
    trainer = make_paired_trainer(dataset, tmp_path, mixed_precision="fp16", max_steps=4, eval_every=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = trainer.train()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    frozen = {p.dtype for n, p in trainer.unwrapped.named_parameters() if not trainer.unwrapped.is_trained(n)}
    assert frozen == {torch.float16} and trainer.scaler.get_scale() < 2.0**16
    assert logs["skipped_steps"] == 0 and all(math.isfinite(v) for v in logs.values()), logs


def test_accumulated_batches_cast_each_trainable_weight_once_and_backward_runs_without_autocast(dataset, tmp_path):
    """bf16 with two accumulated batches: one autocast spans both, so autocast's cache casts each fp32 trainable
    weight once per iteration (the discriminator's once in the generator's step, for the GAN term, and once in its
    own), and the backward passes run with autocast off (LPIPS is differentiated in fp32, as it was computed)."""
    trainer = make_paired_trainer(dataset, tmp_path, mixed_precision="bf16", gradient_accumulation_steps=2)
    generator, discriminator = trained_weights(trainer.unwrapped), trained_weights(trainer.discriminator)
    with autocast_in_backward(trainer.lpips) as lpips_backward, WeightCasts({**generator, **discriminator}) as counter:
        logs = trainer.train_step()
    assert logs["skipped_steps"] == 0
    assert {counter.casts.get(name) for name in generator} == {1}
    cast = {name: n for name, n in counter.casts.items() if name in discriminator}  # BatchNorm runs in fp32
    assert {name for name, p in discriminator.items() if p.ndim == 4} <= cast.keys() and set(cast.values()) == {2}
    assert lpips_backward == [False, False]  # one LPIPS term per batch


def test_compile_option_compiles_the_generator_parts(dataset, tmp_path):
    """--compile reaches the paired trainer's UNet and VAE parts (compiled in place, on their first call; what compiled
    parts compute is tested on the unpaired trainer, which calls the same ``compile_parts``)."""
    trainer = make_paired_trainer(dataset, tmp_path, compile=True)
    vae = trainer.unwrapped.vae[trainer.unwrapped.config.default_direction]
    parts = (trainer.unwrapped.unet, vae.encoder, vae.decoder)
    assert all(part._compiled_call_impl is not None for part in parts)  # nn.Module.compile's in-place wrapper
    eager = make_paired_trainer(dataset, tmp_path / "eager")
    assert eager.unwrapped.unet._compiled_call_impl is None


def test_clip_is_not_loaded_when_the_terms_that_use_it_are_off(dataset, tmp_path, monkeypatch):
    # --disc clip with --lambda-gan 0 --lambda-clipsim 0: no term needs CLIP, so nothing may be downloaded (offline it
    # used to fail on the missing ViT-B/32 weights)
    def no_download(**kwargs):
        raise AssertionError("CLIP was loaded")

    monkeypatch.setattr("turbo_i2i.training.pretrained.load_clip", no_download)
    options = dict(dataset=str(dataset), output_dir=str(tmp_path), base_model="tiny", transform="no_resize")
    config = PairedTrainConfig(**options, disc="clip", lambda_gan=0.0, lambda_clipsim=0.0, eval_metrics="")
    trainer = PairedTrainer(config, loss_networks=(tiny_lpips(), None))
    assert trainer.discriminator is None and trainer.clipsim is None


def test_missing_networks_offline_name_the_train_commands_options(dataset, tmp_path, monkeypatch, capsys):
    # the loaders' paragraphs used to end in eval's --no-fid and Python's tiny_lpips(), which train does not take
    from turbo_i2i.evaluation import fid

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(fid, "CLEANFID_FOLDER", tmp_path / "cleanfid")
    args = ["train", "paired", "--dataset", str(dataset), "--base-model", "tiny", "--transform", "no_resize",
            "--max-steps", "1", "--report-to", "none"]  # fmt: skip
    expected = {  # each run goes one network further
        (): ["--inception-path FILE", "leaving fid out of --eval-metrics"],
        ("--eval-metrics", ""): ["--lpips-path FILE", "--lambda-lpips 0"],
        ("--eval-metrics", "", "--lambda-lpips", "0"): ["--clip-path FILE", "--lambda-clipsim 0 with --disc patchgan"],
    }
    for i, (extra, names) in enumerate(expected.items()):
        assert main([*args, *extra, "--output-dir", str(tmp_path / f"run{i}")]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "--no-fid" not in err and "tiny_" not in err, err
        assert all(name in err for name in names), err


def test_problems_of_both_splits_are_listed_in_one_message(dataset, tmp_path):
    # the test split used to be checked only once the training split passed: a second run to see its problems
    import shutil

    data = shutil.copytree(dataset, tmp_path / "data")
    captions = json.loads((data / "train_prompts.json").read_text())
    captions[next(iter(captions))] = "   "
    (data / "train_prompts.json").write_text(json.dumps(captions))
    (data / "test_prompts.json").unlink()
    options = dict(dataset=str(data), output_dir=str(tmp_path / "run"), base_model="tiny", transform="no_resize")
    with pytest.raises(BadInputError) as error:
        PairedTrainer(PairedTrainConfig(**options), loss_networks=(tiny_lpips(), None))
    message = str(error.value)
    assert "train_prompts.json" in message and "test_prompts.json is missing" in message, message


def test_the_test_pairs_take_the_eval_transform_and_by_default_the_training_one(dataset, tmp_path):
    # random crops and flips were applied to the test pairs too: no paired option scored whole pictures
    trainer = make_paired_trainer(dataset, tmp_path / "run", transform="resize_286_randomcrop_256x256_hflip",
                                  eval_transform="resize_48", batch_size=1)  # fmt: skip
    assert trainer.train_data[0]["input"].shape[-2:] == (256, 256)
    assert trainer.test_data[0]["input"].shape[-2:] == (48, 48) and trainer.test_data.transform.name == "resize_48"
    default = make_paired_trainer(dataset, tmp_path / "run2", transform="resize_40", batch_size=1)
    assert default.test_data[0]["target"].shape[-2:] == (40, 40)
    options = dict(dataset=str(dataset), output_dir=str(tmp_path / "run3"), base_model="tiny", eval_transform="crop")
    with pytest.raises(BadInputError, match="crop"):
        PairedTrainer(PairedTrainConfig(**options), loss_networks=(tiny_lpips(), None))
    import shutil

    data = shutil.copytree(dataset, tmp_path / "data")
    for path in [*(data / "test_A").iterdir(), *(data / "test_B").iterdir()]:
        Image.open(path).resize((36, 36)).save(path)
    options.update(dataset=str(data), transform="resize_32", eval_transform="no_resize")
    with pytest.raises(
        BadInputError, match=r"(?s)test split.*is 36x36.*\(--eval-transform\)"
    ):  # the test pairs' option
        PairedTrainer(PairedTrainConfig(**options), loss_networks=(tiny_lpips(), None))
