"""Unpaired (CycleGAN-Turbo) training on the tiny backbone and generated data: the objective learns, resume is exact,
one export holds both directions, the frozen VAE is shared, the joint objective runs six generator passes (the public
schedule eight), the discriminator step is isolated, only trainable weights change, bad data exit 2."""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers.models.upsampling import Upsample2D
from PIL import Image
from trainers import (
    CAPTION_A,
    CAPTION_B,
    WeightCasts,
    autocast_in_backward,
    check_shared_evaluation,
    make_unpaired,
    make_unpaired_trainer,
    train_three_steps,
    trained_weights,
)

from turbo_i2i.checkpoints import load_pretrained
from turbo_i2i.cli import main
from turbo_i2i.errors import BadInputError
from turbo_i2i.evaluation import tiny_dino, tiny_inception
from turbo_i2i.pipeline import Translator
from turbo_i2i.training.loop import LOG_FILE, save_grid, translation_metrics
from turbo_i2i.training.pretrained import tiny_lpips
from turbo_i2i.training.unpaired import UnpairedTrainConfig, UnpairedTrainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_unpaired(tmp_path_factory.mktemp("data") / "unpaired")


def count_passes(trainer):
    """Record the direction of every generator forward call (a forward pre-hook; the model is not changed)."""
    calls = []
    handle = trainer.generator.register_forward_pre_hook(lambda module, args: calls.append(args[2]))
    return calls, handle


def test_short_run_lowers_the_cycle_loss(tmp_path):
    # one image per domain and batch 1: every step sees the same pair, so the loss curve is not batch noise
    data = make_unpaired(tmp_path / "one", n=2, keep_test=False, drop_b=0)
    for domain in "AB":
        (data / f"train_{domain}" / "000001.png").unlink()
    trainer = make_unpaired_trainer(data, tmp_path / "run", disc="none", max_steps=100)
    cycle = []
    for _ in range(10):
        logs = trainer.train_step()
        cycle.append(logs["loss_cycle_a"] + logs["loss_cycle_b"])
    assert cycle[-1] < 0.6 * cycle[0], cycle


def test_joint_runs_six_generator_passes_and_separate_eight(dataset, tmp_path):
    joint = make_unpaired_trainer(dataset, tmp_path / "joint")
    calls, handle = count_passes(joint)
    logs = joint.train_step()
    handle.remove()
    assert sorted(calls) == ["a2b"] * 3 + ["b2a"] * 3
    assert {"loss_cycle_a", "loss_cycle_b", "loss_idt_a", "loss_idt_b", "loss_gan_a", "loss_gan_b"} <= set(logs)
    separate = make_unpaired_trainer(dataset, tmp_path / "separate", step_mode="separate")
    calls, handle = count_passes(separate)
    separate.train_step()
    handle.remove()
    assert sorted(calls) == ["a2b"] * 4 + ["b2a"] * 4
    # both modes step the LR schedule once per iteration
    assert joint.scheduler_g.last_epoch == separate.scheduler_g.last_epoch == 1


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_joint_gradient_in_segments_equals_one_backward_and_holds_fewer_activations(dataset, tmp_path, precision):
    trainer = make_unpaired_trainer(dataset, tmp_path, mixed_precision=precision)
    batch = trainer.batch(0)
    trained = [(n, p) for n, p in trainer.generator.named_parameters() if p.requires_grad]

    def saved_bytes_peak(run):
        """Peak bytes of tensors saved for backward that are alive at once (autograd's saved-tensor hooks)."""
        alive, peak = {}, [0]

        def pack(t):
            key = object()
            alive[id(key)] = t.numel() * t.element_size()
            peak[0] = max(peak[0], sum(alive.values()))
            return key, t

        def unpack(packed):
            alive.pop(id(packed[0]), None)
            return packed[1]

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            result = run()
        return result, peak[0]

    def one_backward():
        torch.manual_seed(5)  # DiffAugment draws in the GAN terms
        terms, _ = trainer.losses(batch["a"], batch["b"])
        trainer.accelerator.backward(terms["loss_g"])
        return terms

    def segments():
        torch.manual_seed(5)
        return trainer.joint_backward(batch["a"], batch["b"])

    reference, peak_one = saved_bytes_peak(one_backward)
    expected = {n: p.grad.clone() for n, p in trained}
    trainer.optimizer_g.zero_grad(set_to_none=True)
    (terms, images, bad), peak_segments = saved_bytes_peak(segments)
    assert bad is None
    for key in ("loss_cycle_a", "loss_cycle_b", "loss_idt_a", "loss_idt_b", "loss_gan_a", "loss_gan_b", "loss_g"):
        torch.testing.assert_close(terms[key], reference[key].detach(), rtol=1e-5, atol=1e-6)
    for name, param in trained:
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not any(v.requires_grad for v in images.values())
    # six passes' activations in one graph against at most two passes' at a time
    assert peak_segments < 0.5 * peak_one, (peak_segments, peak_one)


def test_half_precision_casts_each_trainable_weight_once_and_backward_runs_without_autocast(dataset, tmp_path):
    """bf16: one autocast spans the six passes, so autocast's cache casts each fp32 trainable weight once per
    iteration (not once per pass); the backward passes run with autocast off, so the fp32 parts (LPIPS) are
    differentiated in fp32 as they were computed."""
    trainer = make_unpaired_trainer(dataset, tmp_path, mixed_precision="bf16")
    batch = trainer.batch(0)
    trained = trained_weights(trainer.generator)
    with autocast_in_backward(trainer.lpips) as lpips_backward, WeightCasts(trained) as counter:
        _, _, bad = trainer.joint_backward(batch["a"], batch["b"])
    assert bad is None
    assert counter.casts.keys() == trained.keys() and set(counter.casts.values()) == {1}
    assert len(lpips_backward) == 4 and not any(lpips_backward)  # the cycle and identity terms


def test_accumulated_batches_cast_each_trainable_weight_once_per_step(dataset, tmp_path):
    """With two accumulated batches, one autocast spans both: the generator's weights are cast once per iteration,
    the discriminators' once in the generator's step (the GAN terms) and once in their own."""
    trainer = make_unpaired_trainer(dataset, tmp_path, mixed_precision="bf16", gradient_accumulation_steps=2)
    generator, discriminators = trained_weights(trainer.generator), trained_weights(trainer.discriminator)
    with WeightCasts({**generator, **discriminators}) as counter:
        logs = trainer.train_step()
    assert logs["skipped_steps"] == 0
    assert {counter.casts.get(name) for name in generator} == {1}
    cast = {name: n for name, n in counter.casts.items() if name in discriminators}  # BatchNorm runs in fp32
    assert {name for name, p in discriminators.items() if p.ndim == 4} <= cast.keys() and set(cast.values()) == {2}


def test_two_processes_match_one_process_with_the_doubled_batch(dataset, tmp_path):
    """Data-parallel unpaired training (gloo on the CPU, launched the way Accelerate launches it): each rank trains on
    its half of the batch and the gradients are averaged: the gradient of the first step is the one of a single
    process with the doubled batch up to float summation order (no discriminator here: DiffAugment draws its
    augmentations per call, so the halves would not see the batch's), and both ranks end with identical weights, with
    and without two discriminators; the evaluation is shared between the processes. (Weights are not compared with
    the single process's: Adam divides each gradient by its own size, which turns summation-order noise in near-zero
    gradients into steps of the learning rate.)"""
    shared = make_unpaired(tmp_path / "data", test_fraction=0.3)  # three test images per domain to share
    rank0, rank1 = train_three_steps("unpaired", shared, tmp_path / "two", 1, processes=2)
    (single,) = train_three_steps("unpaired", shared, tmp_path / "one", 2)
    check_shared_evaluation(rank0, rank1, single)
    own = rank0.pop("own_loss_g"), rank1.pop("own_loss_g")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    gradients = [k for k in rank0 if k.startswith("gradient.")]
    assert len(gradients) == len(rank0) // 2  # every trained tensor has one
    for key in gradients:
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-4 * float(single[key].abs().max()))
    # the log holds the whole batch's loss: the mean of the processes' own (which differ: their images do)
    logged = [json.loads(line)["loss_g"] for line in (tmp_path / "two" / LOG_FILE).read_text().splitlines()]
    assert not torch.equal(*own)
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float32), (own[0] + own[1]) / 2)
    # one test image per domain: rank 1's share of the evaluation is empty, and it still gets the scores
    rank0, rank1 = train_three_steps("unpaired", dataset, tmp_path / "gan", 1, processes=2, disc="patchgan")
    assert [int(rank0["eval_passes"]), int(rank1["eval_passes"])] == [4, 0]
    assert all(torch.equal(rank0[k], v) for k, v in rank1.items() if k.startswith("eval."))
    assert any(k.startswith("discriminator.") for k in rank0)
    trained = [k for k in rank0 if not k.startswith(("own_", "eval", "metric_"))]
    assert all(torch.equal(rank0[k], rank1[k]) for k in trained)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_accumulated_batches_take_the_step_of_the_larger_batch(dataset, tmp_path):
    """--gradient-accumulation-steps 2 at batch 1 takes the step one batch of 2 (the same two pairs) would: the same
    gradient up to float summation order, the losses logged as the batches' means; D steps once per iteration."""

    def first_step(trainer):
        gradient, take_step = {}, trainer.optimizer_g.step

        def step_recording_the_gradient(*args, **kwargs):
            gradient.update({n: p.grad.clone() for n, p in trainer.generator.named_parameters() if p.grad is not None})
            return take_step(*args, **kwargs)

        trainer.optimizer_g.step = step_recording_the_gradient
        return gradient, trainer.train_step()

    options = dict(disc="none", max_grad_norm=0.0)
    accumulated, logs = first_step(
        make_unpaired_trainer(dataset, tmp_path / "k", gradient_accumulation_steps=2, **options)
    )
    batched, batch_logs = first_step(make_unpaired_trainer(dataset, tmp_path / "b", batch_size=2, **options))
    assert accumulated.keys() == batched.keys() and batched
    for name, expected in batched.items():
        torch.testing.assert_close(accumulated[name], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert logs.keys() == batch_logs.keys()
    assert all(logs[k] == pytest.approx(v, rel=1e-5) for k, v in batch_logs.items()), (logs, batch_logs)
    with_d = make_unpaired_trainer(dataset, tmp_path / "d", gradient_accumulation_steps=2)
    assert all(np.isfinite(v) for v in with_d.train_step().values())
    assert {int(state["step"]) for state in with_d.optimizer_d.state.values()} == {1}
    with pytest.raises(BadInputError, match="step-mode joint"):
        make_unpaired_trainer(dataset, tmp_path / "s", gradient_accumulation_steps=2, step_mode="separate")


def test_a_nan_in_a_segment_clears_the_gradients_and_skips_the_step(dataset, tmp_path):
    trainer = make_unpaired_trainer(dataset, tmp_path, disc="none")
    batch = trainer.batch(0)
    before = {n: p.detach().clone() for n, p in trainer.generator.named_parameters()}
    bad_b = batch["b"].clone()
    bad_b[0, 0, 0, 0] = float("nan")
    terms, _, bad = trainer.joint_backward(batch["a"], bad_b)
    assert bad == "generator loss"
    assert all(p.grad is None for p in trainer.generator.parameters())  # a2b's segment had left gradients
    params = dict(trainer.generator.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in before)


def test_generator_step_leaves_d_alone_and_only_trainable_weights_change(dataset, tmp_path):
    trainer = make_unpaired_trainer(dataset, tmp_path)
    # sub-pixel upsampling in the VAE decoders, the UNet's upsamplers as they are
    assert trainer.upsampler_swaps and not any(isinstance(m, Upsample2D) for m in trainer.generator.vae.modules())
    assert any(isinstance(m, Upsample2D) for m in trainer.generator.unet.modules())
    before = {n: p.detach().clone() for n, p in trainer.generator.named_parameters()}
    d_before = {n: p.detach().clone() for n, p in trainer.discriminator.named_parameters()}
    batch = trainer.batch(0)
    terms, _ = trainer.losses(batch["a"], batch["b"])
    trainer.accelerator.backward(terms["loss_g"])
    assert all(p.grad is not None for p in trainer.discriminator.parameters() if p.requires_grad)  # G's GAN term
    trainer.optimizer_g.step()
    assert all(torch.equal(p, d_before[n]) for n, p in trainer.discriminator.named_parameters())
    changed = {n for n, p in trainer.generator.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(trainer.generator.is_trained(n) for n in changed)
    assert any("vae.a2b" in n for n in changed) and any("vae.b2a" in n for n in changed)
    trainer.optimizer_g.zero_grad()
    trainer.train_step()  # a whole iteration: D learns, from its own loss only
    params = dict(trainer.generator.named_parameters())
    assert all(torch.equal(params[n], before[n]) for n in before if not trainer.generator.is_trained(n))
    assert any(not torch.equal(p, d_before[n]) for n, p in trainer.discriminator.named_parameters())


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_directions_share_one_frozen_vae_and_trainable_weights_stay_fp32(dataset, tmp_path, precision):
    trainer = make_unpaired_trainer(dataset, tmp_path, mixed_precision=precision, gradient_checkpointing=True)
    a2b = dict(trainer.generator.vae["a2b"].named_parameters(remove_duplicate=False))
    b2a = dict(trainer.generator.vae["b2a"].named_parameters(remove_duplicate=False))
    assert a2b.keys() == b2a.keys()
    frozen = [n for n in a2b if not a2b[n].requires_grad]
    assert len(frozen) > 20 and all(a2b[n].data_ptr() == b2a[n].data_ptr() for n in frozen)
    trained = [n for n in a2b if a2b[n].requires_grad]
    assert trained and all(a2b[n].data_ptr() != b2a[n].data_ptr() for n in trained)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    assert all(a2b[n].dtype == half for n in frozen) and all(a2b[n].dtype == torch.float32 for n in trained)
    convs = [p for p in trainer.generator.parameters() if p.ndim == 4 and p.shape[-1] == 3]
    # channels-last on the CPU in half precision only (channels_last_in_training); shared weights are converted once
    assert {p.is_contiguous(memory_format=torch.channels_last) for p in convs} == {precision != "no"}
    assert not hasattr(trainer, "text_encoder") and trainer.prompt_embeds["a2b"].shape[:2] == (1, 77)
    logs = trainer.train_step()  # autocast over half-precision frozen and fp32 trainable weights, checkpointed blocks
    assert np.isfinite(logs["loss_g"]) and all(
        p.dtype == torch.float32 for p in trainer.optimizer_g.param_groups[0]["params"]
    )
    assert all(a2b[n].data_ptr() == b2a[n].data_ptr() for n in frozen)  # still shared after the step


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the resume test compares against this run with one-thread kernels
    try:
        trainer = make_unpaired_trainer(dataset, tmp_path_factory.mktemp("straight"))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer


def test_stop_and_resume_equals_straight_run(dataset, straight_run, tmp_path, one_thread):
    first = make_unpaired_trainer(dataset, tmp_path)
    first.train(stop_at=2)
    assert first.step == 2 and not (tmp_path / "model").exists()
    resumed = make_unpaired_trainer(dataset, tmp_path)  # a new process builds everything afresh too
    resumed.train(resume=True)
    assert resumed.step == 4
    a, b = straight_run.generator.trained_state_dict(), resumed.generator.trained_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical (one-thread kernels)
    d_a, d_b = straight_run.discriminator.state_dict(), resumed.discriminator.state_dict()
    assert all(torch.equal(d_a[k], d_b[k]) for k in d_a)


def test_fp16_scales_the_loss_and_resumes_exactly(dataset, tmp_path, one_thread):
    """fp16 training: the scaler lowers its scale after overflowing gradients and skips those updates itself (not
    counted as faults, nor warned about as a scheduler stepping before its optimiser), and the scale is part of the
    checkpoint, so stop-and-resume equals the straight run."""
    straight = make_unpaired_trainer(dataset, tmp_path / "straight", mixed_precision="fp16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = straight.train()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert straight.scaler.is_enabled() and straight.scaler.get_scale() < 2.0**16  # the initial scale overflowed
    assert logs["skipped_steps"] == 0 and all(np.isfinite(v) for v in logs.values())
    first = make_unpaired_trainer(dataset, tmp_path / "run", mixed_precision="fp16")
    first.train(stop_at=2)
    resumed = make_unpaired_trainer(dataset, tmp_path / "run", mixed_precision="fp16")
    resumed.train(resume=True)
    assert resumed.step == 4 and resumed.scaler.get_scale() == straight.scaler.get_scale()
    a, b = straight.generator.trained_state_dict(), resumed.generator.trained_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_holds_both_directions_and_reloads_bit_exactly(straight_run):
    folder = straight_run.output_dir / "model"
    generator, _ = load_pretrained(folder)
    assert generator.config.task == "unpaired" and generator.config.prompts == {"a2b": CAPTION_B, "b2a": CAPTION_A}
    assert generator.config.unet_lora_rank == generator.config.unet_lora_alpha == 4
    saved, trained = generator.trained_state_dict(), straight_run.generator.trained_state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    assert any(k.startswith("unet.conv_in.base_layer") for k in saved)  # the trained conv_in is kept

    translator = Translator.from_pretrained(folder)
    image = Image.open(straight_run.config.dataset + "/test_A/" + straight_run.test_data.files["A"][0].name)
    image = image.resize((64, 64))  # the Translator runs tiny inputs at 64 px
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    outputs = {}
    for direction in ("a2b", "b2a"):
        with torch.no_grad():
            expected = straight_run.generator.eval()(x, straight_run.prompt_embeds[direction], direction)[0]
        got = torch.from_numpy(np.asarray(translator(image, direction=direction), dtype=np.float32))
        assert (got - (expected.permute(1, 2, 0) * 127.5 + 127.5).round().clamp(0, 255)).abs().max() <= 1
        outputs[direction] = got
    assert (outputs["a2b"] - outputs["b2a"]).abs().max() > 1  # two different translations
    straight_run.generator.train()


def test_a_run_can_start_from_an_unpaired_model_with_larger_ranks(dataset, straight_run, tmp_path):
    """--from-model (e.g. an official unpaired model, fine-tuned on one's own sets): the new generator, with UNet LoRA
    rank 8 where the source has 4, translates both ways exactly as the exported source model does."""
    source = load_pretrained(straight_run.output_dir / "model")[0].eval()
    trainer = make_unpaired_trainer(
        dataset, tmp_path, disc="none", unet_lora_rank=8, from_model=str(straight_run.output_dir / "model")
    )
    assert trainer.generator.config.unet_lora_rank == 8 and source.config.unet_lora_rank == 4
    trainer.generator.eval()
    x = trainer.batch(0)["a"]
    with torch.no_grad():
        for direction in ("a2b", "b2a"):
            expected = source(x, trainer.prompt_embeds[direction], direction)
            torch.testing.assert_close(trainer.translate(x, direction), expected, rtol=0, atol=1e-5)
    with pytest.raises(BadInputError, match="another task"):
        make_unpaired_trainer(dataset, tmp_path / "paired", from_model="demo-circles", base_model="tiny-circles")


def test_evaluation_scores_both_directions(dataset, tmp_path):
    metrics = translation_metrics(None, tiny_dino())
    trainer = make_unpaired_trainer(dataset, tmp_path, num_eval=0, disc="none", metrics=metrics)
    scores = trainer.evaluate()
    ((_, a),) = trainer.test_data.images("A")
    ((_, b),) = trainer.test_data.images("B")
    with torch.no_grad():
        fake_b = trainer.translate(a[None], "a2b")
        rec_a = trainer.translate(fake_b, "b2a")
        fake_a = trainer.translate(b[None], "b2a")
        rec_b = trainer.translate(fake_a, "a2b")
    assert scores["eval_cycle_l1_a"] == pytest.approx(float((rec_a - a[None]).abs().mean()), rel=1e-5)
    assert set(scores) == {"eval_cycle_l1_a", "eval_cycle_l1_b", "eval_a2b_dino_structure", "eval_b2a_dino_structure"}
    assert all(v >= 0 for v in scores.values()) and trainer.generator.training
    # the grid: one row per test image (A, then B): input, translation, translation back; 2-pixel padding
    grid = np.asarray(Image.open(tmp_path / "eval" / "step_0000000.png").convert("RGB")).astype(np.float32) / 255
    size = a.shape[-1]
    assert grid.shape == (2 * size + 3 * 2, 3 * size + 4 * 2, 3)
    for row, images in enumerate(((a[None], fake_b, rec_a), (b[None], fake_a, rec_b))):
        for column, image in enumerate(images):
            top, left = 2 + row * (size + 2), 2 + column * (size + 2)
            cell = grid[top : top + size, left : left + size]
            expected = ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) / 2).numpy()
            assert np.abs(cell - expected).max() <= 1 / 255 + 1e-6, (row, column)


def test_fids_reference_set_is_the_whole_target_test_split_whatever_num_eval(tmp_path):
    """num_eval limits the images translated, not FID's reference set: 16 references (the default) measured the
    small-sample bias, not the translation."""
    data = make_unpaired(tmp_path / "data", n=20, test_fraction=0.25)  # 5 test images per domain
    seen = {}

    def metrics(direction, inputs, outputs, references):
        seen[direction] = (len(inputs), len(outputs), [r.clone() for r in references])
        return {}

    trainer = make_unpaired_trainer(data, tmp_path / "run", num_eval=2, disc="none", metrics=metrics)
    trainer.evaluate()
    for direction, target in (("a2b", "B"), ("b2a", "A")):
        n_in, n_out, references = seen[direction]
        whole = [image for _, image in trainer.test_data.images(target)]
        assert n_in == n_out == 2 and len(whole) == 5 and len(references) == 5
        assert all(torch.equal(r, w) for r, w in zip(references, whole))


def test_the_evaluation_grid_reaches_tensorboard(dataset, tmp_path):
    """The grid written at an evaluation is also in TensorBoard's images (tag ``eval_grid``, at the step), pixel for
    pixel."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_unpaired_trainer(dataset, tmp_path, disc="none", max_steps=2, eval_every=2, report_to="tensorboard")
    trainer.train()
    events = EventAccumulator(str(tmp_path / tmp_path.name), size_guidance={"images": 0})  # the run's name: its folder
    events.Reload()
    (image,) = events.Images("eval_grid")
    shown = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert image.step == 2
    assert np.array_equal(shown, np.asarray(Image.open(tmp_path / "eval" / "step_0000002.png").convert("RGB")))


def test_the_grid_shows_images_of_other_sizes_at_the_first_ones_size(tmp_path):
    """Test images may differ in size: each grid cell shows its image resized to the first image's size."""
    rows = [
        [torch.full((3, 8, 8), -1.0), torch.full((3, 8, 8), 1.0)],
        [torch.zeros(3, 4, 6), torch.full((3, 16, 12), -1.0)],
    ]
    grid = np.asarray(Image.open(save_grid(rows, tmp_path / "grid.png")).convert("L")).astype(int)
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    cells = [[grid[2 + r * 10 : 10 + r * 10, 2 + c * 10 : 10 + c * 10] for c in range(2)] for r in range(2)]
    assert [[(int(cell.min()), int(cell.max())) for cell in row] for row in cells] == [
        [(0, 0), (255, 255)],
        [(128, 128), (0, 0)],
    ]


def test_fid_metric_needs_two_images_per_set_and_separates_sets():
    metrics = translation_metrics(tiny_inception(), None)
    rng = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 32, 32, generator=rng) * 2 - 1 for _ in range(6)]
    assert metrics("a2b", images[:1], images[:1], images) == {}  # no FID from one image
    assert abs(metrics("a2b", images, images, images)["fid"]) < 1e-6
    washed_out = [0.9 + 0.1 * x for x in images]
    assert metrics("b2a", images, washed_out, images)["fid"] > 1e-3


def test_bad_dataset_gives_one_message_and_exit_2(tmp_path, capsys):
    root = make_unpaired(tmp_path / "bad")
    (root / "train_A" / "000002.png").write_text("not an image")
    (root / "fixed_prompt_b.txt").unlink()
    code = main(
        ["train", "unpaired", "--dataset", str(root), "--output-dir", str(tmp_path / "run"), "--base-model", "tiny"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "2 problems" in err and "000002.png" in err and "fixed_prompt_b.txt" in err
    assert "Traceback" not in err
    code = main(
        ["train", "unpaired", "--dataset", str(root), "--output-dir", str(tmp_path / "run"), "--step-mode", "x"]
    )
    assert code == 2 and "step_mode" in capsys.readouterr().err


def test_cli_trains_and_the_model_translates_both_ways(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        ["train", "unpaired", "--dataset", str(dataset), "--output-dir", str(run), "--base-model", "tiny",
         "--transform", "no_resize", "--unet-lora-rank", "4", "--disc", "none", "--max-steps", "1",
         "--eval-metrics", "", "--lambda-cycle-lpips", "0", "--lambda-idt-lpips", "0"]
    )  # fmt: skip
    assert code == 0 and "loss_cycle_a=" in capsys.readouterr().out
    assert (run / "model" / "config.json").is_file() and (run / "checkpoints" / "step_0000001").is_dir()
    source = next((dataset / "test_B").iterdir())
    for direction in ("a2b", "b2a"):
        out = tmp_path / f"{direction}.png"
        args = ["--model", str(run / "model"), "--input", str(source), "--output", str(out), "--direction", direction]
        assert main(["translate", *args]) == 0
        assert Image.open(out).size == Image.open(source).size


def test_vision_aided_discriminators_share_one_clip_tower_through_a_checkpoint(dataset, tmp_path):
    from turbo_i2i.training.pretrained import tiny_clip

    def build():
        config = UnpairedTrainConfig(
            dataset=str(dataset), output_dir=str(tmp_path), base_model="tiny", transform="no_resize",
            unet_lora_rank=4, disc="clip", eval_metrics="",
        )  # fmt: skip
        return UnpairedTrainer(config, loss_networks=(tiny_lpips(), tiny_clip()))

    trainer = build()
    d_a, d_b = trainer.discriminator["a"], trainer.discriminator["b"]
    assert d_a.visual is d_b.visual and d_a.heads is not d_b.heads  # one frozen tower, two sets of heads
    trainer.train_step()
    folder = trainer.save_checkpoint()
    resumed = build()
    resumed.load_checkpoint(folder)
    assert resumed.discriminator["a"].visual is resumed.discriminator["b"].visual
    saved, loaded = trainer.discriminator.state_dict(), resumed.discriminator.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh = build().discriminator.state_dict()
    assert any(not torch.equal(saved[k], fresh[k]) for k in saved)  # D did learn, and the checkpoint carries it


def test_captions_are_encoded_once_and_the_text_encoder_is_freed(dataset, tmp_path):
    import gc
    import weakref

    from turbo_i2i.backbone import encode_prompt, load_backbone

    backbone = load_backbone("tiny")
    expected = encode_prompt(backbone.tokenizer, backbone.text_encoder, [CAPTION_B])[0]
    text_encoder = weakref.ref(backbone.text_encoder)
    config = UnpairedTrainConfig(
        dataset=str(dataset), output_dir=str(tmp_path), base_model="tiny", unet_lora_rank=4, disc="none",
        transform="no_resize", eval_metrics="",
    )  # fmt: skip
    trainer = UnpairedTrainer(config, loss_networks=(tiny_lpips(), None), backbone=backbone)
    del backbone
    gc.collect()
    assert text_encoder() is None  # nothing of the trainer keeps it alive
    assert torch.equal(trainer.prompt_embeds["a2b"], expected)  # a2b is conditioned on domain B's caption
    assert trainer.generator.config.prompts == {"a2b": CAPTION_B, "b2a": CAPTION_A}


def test_compiled_parts_train_as_the_eager_ones_do_and_compile_once(dataset, tmp_path):
    """--compile: the UNet and VAE parts run under torch.compile; gradients and losses are the eager trainer's up to
    float reordering in fused kernels, and later steps reuse the first step's graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = make_unpaired_trainer(dataset, tmp_path / "eager", max_steps=10)
    compiled = make_unpaired_trainer(dataset, tmp_path / "compiled", max_steps=10, compile=True)
    batch = eager.batch(0)
    grads = []
    for trainer in (eager, compiled):
        torch.manual_seed(0)  # the same augmentation draws
        trainer.joint_backward(batch["a"], batch["b"])
        grads.append({n: p.grad.clone() for n, p in trainer.generator.named_parameters() if p.grad is not None})
        trainer.optimizer_g.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, want in grads[0].items():
        assert (grads[1][name] - want).abs().max() <= 1e-3 * want.abs().max() + 1e-7, name
    graphs = counters["stats"]["unique_graphs"]
    expected, got = [eager.train_step() for _ in range(2)], [compiled.train_step() for _ in range(2)]
    # the first backward pass compiled the UNet's, the encoders' and the decoders' graphs; the steps add none
    assert graphs >= 3 and counters["stats"]["unique_graphs"] == graphs
    for want, have in zip(expected, got):
        for key in ("loss_g", "loss_cycle_a", "loss_cycle_b", "loss_idt_a", "loss_idt_b", "loss_gan_a", "loss_d_b"):
            assert have[key] == pytest.approx(want[key], rel=1e-4), key
    # compiled in place: the names that checkpoints and exports save do not change
    assert eager.generator.trained_state_dict().keys() == compiled.generator.trained_state_dict().keys()
