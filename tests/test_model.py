"""The model layer (ldm/model.py): one padding rule for every context, old checkpoints load, and training,
sampling and init_from share one model object."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_ldm as T
import torch

from ldm.data.latents import collate_latents
from ldm.model import LatentDiffusion
from ldm.pipeline import LatentDiffusionPipeline
from ldm.training.diffusion_module import DiffusionModule

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Made by the commit before the model layer existed (c7c2f17), with tests/tiny_ldm.py's U-Net (256-wide context)
# and autoencoder and the emoji model's text tower, trained 3 steps: weights, EMA and settings as those versions
# saved them (weights_only). The samples file holds what that version's pipeline generated from it.
OLD_CHECKPOINT = FIXTURES / "stage2_before_model_layer.ckpt"
OLD_SAMPLES = FIXTURES / "stage2_before_model_layer_samples.pt"
TEXT = {"_target_": "ldm.conditioning.text.FrozenOpenCLIPTextEncoder", "arch": "ViT-S-32-alt", "layer": "penultimate",
        "max_chunks": 2}


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    return T.autoencoder_ckpt(tmp_path_factory.mktemp("ae"))


def _words(n: int) -> str:
    return " ".join(["cat"] * n)


@pytest.mark.parametrize("use_mask", [True, False])
def test_live_and_cached_captions_give_the_same_contexts(ae, use_mask, monkeypatch):
    # Mixed chunk counts (one caption takes two 77-token chunks), an empty caption and a dropped one; the cache as
    # ldm.data.cache_latents writes it when the captions were encoded in different batches (each as long as its own
    # chunks), collated for training. With use_mask=False (what imported SD1/SD2 weights get) the padding chunks
    # are attended: their values matter.
    conditioner = {**TEXT, "use_mask": use_mask, "cache_size": 64}  # the cache makes encodings exact per caption
    module = T.module(ae, unet={**T.UNET, "context_dim": 256}, conditioner=conditioner, ucg_rate=0.5).train()
    captions = ["a red cat", _words(100), "", "a dog on a blue sofa"]
    drop = [False, False, False, True]
    monkeypatch.setattr(module, "drop_flags", lambda n, generators=None: drop)
    samples = []
    for i, caption in enumerate(captions):
        context, mask = module.model.encode_text([caption])
        samples.append({"context": context[0], "mask": mask[0], "caption": caption, "latent": torch.zeros(4, 8, 8),
                        "key": str(i)})
    cached = collate_latents(samples)
    assert cached["context"].shape[1] == 154 and not cached["mask"][0, 77:].any()  # zero-padded by collation
    live_context, live_mask = module.batch_context({"caption": captions})
    context, mask = module.batch_context(cached)
    assert torch.equal(mask, live_mask)
    assert torch.equal(context, live_context)
    assert bool(mask[0, 77:].any()) == (not use_mask)  # padding chunks attended exactly when use_mask is off


def test_a_checkpoint_written_before_the_model_layer_samples_the_same():
    expected = torch.load(OLD_SAMPLES, weights_only=True)
    pipe = LatentDiffusionPipeline.from_checkpoint(OLD_CHECKPOINT)
    result = pipe.generate(expected["prompts"], steps=3, cfg_scale=3.0, seed=0)
    assert result.prompts == expected["prompts"] and result.seeds == expected["seeds"]
    torch.testing.assert_close(result.latents, expected["latents"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_written_before_the_model_layer_resumes_and_starts_runs(tmp_path):
    ckpt = torch.load(OLD_CHECKPOINT, weights_only=True)
    module = DiffusionModule.from_settings(dict(ckpt["hyper_parameters"]))
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)  # what Lightning does when it resumes
    assert int(module.ema.num_updates) == ckpt["global_step"] == 3
    source = LatentDiffusion.read_source(OLD_CHECKPOINT, tmp_path)  # init_from
    for key, value in ckpt["state_dict"].items():
        if key.startswith("ema.model."):
            assert torch.equal(source.unet_state[key[len("ema.model."):]], value), key


def test_training_sampling_and_the_model_share_one_set_of_weights(ae):
    module = T.module(ae)
    model = module.model
    assert module.unet is model.unet and module.autoencoder is model.autoencoder
    assert module.conditioner is model.conditioner and module.schedule is model.schedule
    # The checkpoint's layout is the model's: unet.*, autoencoder.*, conditioner.* (+ the EMA copy, ema.*).
    assert set(module.state_dict()) == set(model.state_dict()) | {k for k in module.state_dict() if k.startswith("ema.")}
    pipe = LatentDiffusionPipeline.from_module(module, use_ema=True)
    assert pipe.unet is module.ema.model and pipe.autoencoder is model.autoencoder  # shared, not copied
    assert LatentDiffusionPipeline.from_module(module, use_ema=False).unet is model.unet
