import math

import open_clip
import pytest
import torch
from diffusers import DDPMScheduler

from turbo_i2i.backbone import OneStepSchedule, build_clip_tokenizer, encode_prompt, load_backbone
from turbo_i2i.errors import BadInputError, TurboI2IError


def test_tokenizer_matches_open_clip():
    tokenizer = build_clip_tokenizer()
    for prompt in ["a cyan circle on a light golden background", "Driving in heavy rain, at night", "edge map"]:
        ours = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours == open_clip.tokenize([prompt])[0].tolist()
    assert len(tokenizer) == 49408 and tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_matches_ddpm_scheduler_step(prediction_type):
    schedule = OneStepSchedule.from_config({"prediction_type": prediction_type})
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        clip_sample=False,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(1)
    assert schedule.timestep == 999 == int(scheduler.timesteps[0])
    x_t, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    step = scheduler.step(output, 999, x_t)
    torch.testing.assert_close(schedule.x0(x_t, output), step.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.prev_sample, step.pred_original_sample)  # the one step lands on x0
    assert math.isclose(schedule.alpha_cumprod, float(scheduler.alphas_cumprod[999]))


def test_unknown_prediction_type_is_named():
    with pytest.raises(BadInputError, match="prediction_type 'flow'"):
        OneStepSchedule.from_config({"prediction_type": "flow"})


def test_builtin_backbone_is_seeded_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone("tiny")
    after = torch.rand(1)
    b = load_backbone("tiny")
    assert torch.equal(before, after)  # building did not consume the caller's RNG
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in a.unet.parameters())


def test_missing_hub_weights_give_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(TurboI2IError) as info:
        load_backbone("nobody/no-such-model", local_files_only=True)
    message = str(info.value)
    assert "nobody/no-such-model" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    assert "\n" not in message


def test_bad_backbone_name_lists_builtins():
    with pytest.raises(BadInputError, match="tiny"):
        load_backbone("not-a-backbone")


def test_long_prompt_is_reported_as_truncated():
    backbone = load_backbone("tiny")
    embeds, truncated = encode_prompt(backbone.tokenizer, backbone.text_encoder, ["red " * 100, "red"])
    assert embeds.shape == (2, 77, 32) and truncated == ["red " * 100]


def cache_tiny_backbone(cache, repo="someone/tiny-sd"):
    """Put the tiny backbone into a hub cache folder as a download of ``repo`` would; returns the backbone."""
    from diffusers import DDPMScheduler

    tiny = load_backbone("tiny")
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    for part in ("tokenizer", "text_encoder", "unet", "vae"):
        getattr(tiny, part).save_pretrained(snapshot / part)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        snapshot / "scheduler"
    )
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return tiny


def test_a_hub_cache_named_after_import_is_used(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_CACHE once, on import; a notebook that sets it later must still be followed (the
    # backbone used to be looked for in the import-time cache while the message and the loss networks used the new one)
    tiny = cache_tiny_backbone(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded = load_backbone("someone/tiny-sd")  # offline (conftest): from the cache or not at all
    for name, tensor in tiny.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name


def test_a_local_folder_that_is_not_a_backbone_is_bad_input_naming_what_it_lacks(tmp_path):
    (tmp_path / "unet").mkdir()  # used to end in "could not load ... huggingface-cli download", exit 1
    with pytest.raises(BadInputError, match="not in the diffusers layout: it has no tokenizer, text_encoder, vae"):
        load_backbone(tmp_path)


def test_an_unreachable_hub_reads_the_cache_at_once_instead_of_retrying(tmp_path, monkeypatch, caplog):
    # downloads allowed but no network: huggingface_hub retried each file for minutes before our message
    from huggingface_hub import utils

    import turbo_i2i.hub

    class NoNetwork:
        def head(self, *args, **kwargs):
            raise OSError("Name or service not known")

    monkeypatch.setattr(utils, "get_session", lambda: NoNetwork())
    assert not turbo_i2i.hub.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    tiny = cache_tiny_backbone(tmp_path)
    with caplog.at_level("WARNING", logger="turbo_i2i"):
        loaded = load_backbone("someone/tiny-sd")
    assert "cannot be reached; looking for someone/tiny-sd in the local cache only" in caplog.text
    assert torch.equal(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)
    with pytest.raises(TurboI2IError, match="the hub could not be reached and it is not in the local cache"):
        load_backbone("nobody/no-such-model")


@pytest.mark.parametrize("network", ["clip", "dino"])
def test_an_unreachable_hub_sends_the_loss_and_metric_networks_to_the_cache_at_once(
    network, tmp_path, monkeypatch, caplog
):
    # CLIP's weights were asked of an unreachable hub with retries: 50 s before the message
    import huggingface_hub
    from huggingface_hub import utils

    from turbo_i2i.evaluation.dino_structure import load_dino
    from turbo_i2i.training.pretrained import load_clip

    class NoNetwork:
        def head(self, *args, **kwargs):
            raise OSError("Name or service not known")

    asked = []

    def cache_only(repo_id, filename, **kwargs):
        asked.append(kwargs["local_files_only"])
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(utils, "get_session", lambda: NoNetwork())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with caplog.at_level("WARNING", logger="turbo_i2i"), pytest.raises(TurboI2IError) as error:
        load_clip() if network == "clip" else load_dino()
    assert asked and all(asked)  # every candidate file looked for in the cache only
    assert "not in the cache, and the hub cannot be reached" in str(error.value)
    assert f"in the cache {tmp_path}" in str(error.value) and "and on the hub" not in str(error.value)
    assert "hf download" in str(error.value) and "cannot be reached" in caplog.text
