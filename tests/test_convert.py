"""Weight conversion: diffusers folders and CompVis single files ↔ our U-Net, autoencoder and text encoder.

Oracles: diffusers' own models (built, saved with save_pretrained, or filled by diffusers' single-file
converters from files we write) and transformers' CLIPTextModel. All models are small and random; every
comparison is fp32 to 1e-5.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers_oracle import unet_config as diffusers_unet_kwargs
from diffusers_oracle import vae_config as diffusers_vae_kwargs
from safetensors.torch import load_file, save_file

from ldm.conditioning.text import FrozenOpenCLIPTextEncoder
from ldm.convert import ConversionError, load_pretrained, load_unet_state, save_single_file
from ldm.convert.clip_text import conditioner_from_state, hf_to_open_clip, open_clip_arch_for, pad_blocks
from ldm.convert.diffusers_layout import (
    autoencoder_config_from_diffusers,
    unet_config_from_diffusers,
    unet_plan,
    vae_plan,
)
from ldm.convert.infer import AUTOENCODER_PRESET, UNET_PRESETS, infer_unet_config
from ldm.convert.single_file import ema_key
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel

ATOL = 1e-5
PROMPT = "a red cube on a wooden table"

# Small U-Nets in both styles. SD1-style: conv projections, a fixed head count, attention at one level.
# SD2-style: linear projections, a fixed head width (diffusers: per-level head counts), attention at both.
# Attention resolutions run coarse to fine, the order of CompVis configs and of the converted ones.
UNET_STYLES = {
    "sd1": dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                num_heads=2, head_dim=None, context_dim=64, use_linear_projection=False),
    "sd2": dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2, 1],
                num_heads=None, head_dim=16, context_dim=64, use_linear_projection=True),
}
# norm_group_channels=1: diffusers' 32 groups at every width (our default gives narrow layers fewer groups).
VAE_SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_group_channels=1)
# A small CLIP text tower: SD1 reads the last layer (OpenAI CLIP: QuickGELU), SD2 the penultimate (GELU).
TEXT = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
            max_position_embeddings=77, vocab_size=49408)
TEXT_STYLES = {"sd1": dict(act="quick_gelu", layer="last", pad_token="eos"),
               "sd2": dict(act="gelu", layer="penultimate", pad_token="zero")}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: one thread is faster than two that contend with other processes for 2 cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(module: torch.nn.Module) -> torch.nn.Module:
    # Fresh modules have zero-initialised output layers; noise makes every weight matter to the outputs.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def _hf_text_model(act: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    return _perturb(CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act=act)))


def _hf_context(model, tokens: torch.Tensor, layer: str) -> torch.Tensor:
    """What SD takes from an HF CLIP text model: last_hidden_state (SD1), or the penultimate hidden state
    through final_layer_norm (SD2)."""
    out = model(tokens, output_hidden_states=True)
    if layer == "last":
        return out.last_hidden_state
    return model.final_layer_norm(out.hidden_states[-2])


def _tokens(encoder: FrozenOpenCLIPTextEncoder, prompt: str = PROMPT) -> torch.Tensor:
    return encoder.tokenize_chunks([prompt])[0][:, 0]  # (1, 77): the ids both encoders see


def _unet_inputs(context_dim: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0])
    context = torch.randn(2, 77, context_dim, generator=g)
    return x, t, context


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def _our_models(style: str, tmp_path):
    unet_kwargs = UNET_STYLES[style]
    unet = _perturb(UNetModel(**unet_kwargs))
    vae = _perturb(AutoencoderKL(**VAE_SMALL))
    text = TEXT_STYLES[style]
    text_cfg = dict(width=64, heads=2, layers=3, context_length=77, vocab_size=49408, mlp_ratio=4.0)
    arch, _ = open_clip_arch_for(text_cfg, quick_gelu=text["act"] == "quick_gelu", directory=str(tmp_path))
    encoder = FrozenOpenCLIPTextEncoder(arch=arch, layer=text["layer"], pad_token=text["pad_token"],
                                        use_mask=False)
    _perturb(encoder.text)
    return unet, vae, encoder


def _compare_unet(ours: UNetModel, theirs, context_dim: int) -> None:
    x, t, context = _unet_inputs(context_dim)
    with torch.no_grad():
        _assert_close(ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample)


def _compare_vae(ours: AutoencoderKL, theirs) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = ours.encode(x)
        theirs_posterior = theirs.encode(x).latent_dist
        _assert_close(posterior.mean, theirs_posterior.mean)
        _assert_close(posterior.logvar, theirs_posterior.logvar)
        _assert_close(ours.decode(posterior.mean), theirs.decode(posterior.mean).sample)


def _same_outputs(a_unet, b_unet, a_vae, b_vae, context_dim: int) -> None:
    x, t, context = _unet_inputs(context_dim)
    image = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        _assert_close(a_unet(x, t, context), b_unet(x, t, context))
        _assert_close(a_vae.encode(image).mean, b_vae.encode(image).mean)
        _assert_close(a_vae.decode(x[:1]), b_vae.decode(x[:1]))


# ------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_diffusers_folder_loads_with_equal_outputs(style, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel

    unet_kwargs = UNET_STYLES[style]
    their_unet = _perturb(UNet2DConditionModel(**diffusers_unet_kwargs(unet_kwargs)))
    their_vae = _perturb(DiffusersVAE(**diffusers_vae_kwargs(VAE_SMALL)))
    text_model = _hf_text_model(TEXT_STYLES[style]["act"])
    their_unet.save_pretrained(tmp_path / "unet")
    their_vae.save_pretrained(tmp_path / "vae")
    text_model.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "scheduler").mkdir()
    prediction = "epsilon" if style == "sd1" else "v_prediction"
    scheduler = {"prediction_type": prediction, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))

    parts = load_pretrained(tmp_path)
    assert {k: parts.unet_config[k] for k in unet_kwargs} == unet_kwargs
    assert parts.prediction_type == ("eps" if style == "sd1" else "v")
    assert parts.schedule_config == dict(beta_schedule="scaled_linear", num_timesteps=1000, linear_start=0.00085,
                                         linear_end=0.012, zero_terminal_snr=False)
    _compare_unet(parts.unet, their_unet, unet_kwargs["context_dim"])
    _compare_vae(parts.autoencoder, their_vae)

    # A diffusers text encoder is used through last_hidden_state, whatever the family.
    assert parts.conditioner_config["layer"] == "last" and parts.conditioner_config["final_norm"]
    encoder = parts.build_conditioner()
    tokens = _tokens(encoder)
    context, _ = encoder([PROMPT])
    with torch.no_grad():
        _assert_close(context, _hf_context(text_model, tokens, "last"))

    # The written conditioner config loads in a fresh constructor, as a training run would.
    written = parts.write_conditioner(tmp_path / "out")
    rebuilt = FrozenOpenCLIPTextEncoder(**{k: v for k, v in written.items() if k != "_target_"})
    _assert_close(rebuilt([PROMPT])[0], context)


def test_text_encoder_hf_to_open_clip(tmp_path):
    """HF CLIPTextModel weights in our open_clip encoder: SD1's and SD2's layer choices, equal hidden states."""
    for text in TEXT_STYLES.values():
        model = _hf_text_model(text["act"])
        state = hf_to_open_clip(model.state_dict())
        text_cfg = dict(width=64, heads=2, layers=3, context_length=77, vocab_size=49408, mlp_ratio=4.0)
        arch, _ = open_clip_arch_for(text_cfg, quick_gelu=text["act"] == "quick_gelu", directory=str(tmp_path))
        encoder = conditioner_from_state(
            dict(arch=arch, layer=text["layer"], final_norm=True, pad_token=text["pad_token"], use_mask=False), state
        )
        # A long prompt (2 chunks) and padding: each chunk goes through the tower on its own.
        prompt = " ".join(["word"] * 80)
        tokens = encoder.tokenize_chunks([prompt])[0][0]  # (2, 77)
        context, _ = encoder([prompt])
        with torch.no_grad():
            _assert_close(context[0], _hf_context(model, tokens, text["layer"]).flatten(0, 1))

    # diffusers' SD2 text encoder lacks ViT-H-14's last block: padded with a zero block, the penultimate
    # layer of the padded tower is the HF model's last_hidden_state.
    model = _hf_text_model("gelu")
    padded = pad_blocks(hf_to_open_clip(model.state_dict()), 4)
    text_cfg = dict(width=64, heads=2, layers=4, context_length=77, vocab_size=49408, mlp_ratio=4.0)
    arch, _ = open_clip_arch_for(text_cfg, quick_gelu=False, directory=str(tmp_path))
    for layer in ("penultimate", "last"):  # the zero block is the identity, so both agree
        encoder = conditioner_from_state(dict(arch=arch, layer=layer, pad_token="zero", use_mask=False), padded)
        with torch.no_grad():
            _assert_close(encoder([PROMPT])[0], _hf_context(model, _tokens(encoder), "last"))


def test_converted_text_weights_need_no_random_start(tmp_path, caplog):
    """The encoder is built with the converted weights, not built random and overwritten: no false warning, and
    weights that do not fit its tower are a ConversionError naming the key."""
    state = hf_to_open_clip(_hf_text_model("quick_gelu").state_dict())
    text_cfg = dict(width=64, heads=2, layers=3, context_length=77, vocab_size=49408, mlp_ratio=4.0)
    arch, _ = open_clip_arch_for(text_cfg, quick_gelu=True, directory=str(tmp_path))
    config = dict(arch=arch, layer="last", pad_token="eos", use_mask=False)
    with caplog.at_level(logging.WARNING):
        encoder = conditioner_from_state(config, state)
    assert "RANDOM" not in caplog.text
    assert all(torch.equal(encoder.text.state_dict()[k], v.float()) for k, v in state.items())
    with pytest.raises(ConversionError, match="missing.*ln_final.weight"):
        conditioner_from_state(config, {k: v for k, v in state.items() if k != "ln_final.weight"})


def test_sd_presets_map_onto_diffusers_key_for_key():
    """Full-size SD1/SD2 U-Nets and the KL-f8 VAE (on the meta device): every diffusers key has one of ours."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel

    sd_configs = {
        "sd1": dict(cross_attention_dim=768, attention_head_dim=8),
        "sd2": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
    }
    for family, diffusers_config in sd_configs.items():
        config = unet_config_from_diffusers(dict(diffusers_config, block_out_channels=[320, 640, 1280, 1280],
                                                 layers_per_block=2,
                                                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        assert {k: config[k] for k in UNET_PRESETS[family]} == UNET_PRESETS[family]
        with torch.device("meta"):
            ours = UNetModel(**config).state_dict()
            theirs = UNet2DConditionModel(**diffusers_config).state_dict()
        plan = unet_plan(ours, 2)
        assert sorted(s.options[0][0] for s in plan.values()) == sorted(theirs)
        assert all(theirs[plan[k].options[0][0]].shape == v.shape for k, v in ours.items())
        inferred, inferred_family = infer_unet_config(ours)
        assert inferred_family == family and {k: inferred[k] for k in UNET_PRESETS[family]} == UNET_PRESETS[family]

    vae_config = autoencoder_config_from_diffusers(dict(
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4))
    assert vae_config == AUTOENCODER_PRESET
    with torch.device("meta"):
        ours = AutoencoderKL(**vae_config).state_dict()
        theirs = DiffusersVAE(**diffusers_vae_kwargs(vae_config)).state_dict()
    plan = vae_plan(ours, 4)
    assert sorted(s.options[0][0] for s in plan.values()) == sorted(theirs)


# ------------------------------------------------------------------------------------------- single file


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_single_file_matches_diffusers_converters_and_round_trips(style, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet, vae, encoder = _our_models(style, tmp_path)
    path = tmp_path / "model.safetensors"
    save_single_file(path, unet=unet, autoencoder=vae, conditioner=encoder)
    checkpoint = load_file(str(path))
    # SD1 keeps the text model in HF layout, SD2 in open_clip layout (the layouts of the real releases).
    text_prefix = "cond_stage_model.transformer.text_model." if style == "sd1" else "cond_stage_model.model."
    assert any(k.startswith(text_prefix) for k in checkpoint)

    # diffusers' converters read our file: the layout is theirs, and the numbers agree.
    unet_kwargs = UNET_STYLES[style]
    their_unet = UNet2DConditionModel(**diffusers_unet_kwargs(unet_kwargs))
    their_unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, their_unet.config), strict=True)
    their_vae = DiffusersVAE(**diffusers_vae_kwargs(VAE_SMALL))
    their_vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, their_vae.config), strict=True)
    _compare_unet(unet, their_unet.eval(), unet_kwargs["context_dim"])
    _compare_vae(vae, their_vae.eval())

    text_model = _hf_text_model(TEXT_STYLES[style]["act"])
    if style == "sd1":
        text_state = convert_ldm_clip_checkpoint(checkpoint)
    else:
        text_state = convert_open_clip_checkpoint(text_model, checkpoint)
    # The converters emit transformers-4 keys (text_model.*); transformers 5 dropped that wrapper.
    text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    text_model.load_state_dict(text_state, strict=True)
    tokens = _tokens(encoder)
    context, _ = encoder([PROMPT])
    with torch.no_grad():
        _assert_close(context, _hf_context(text_model, tokens, TEXT_STYLES[style]["layer"]))

    # Round trip through our own loader (configs come back from the file's metadata).
    parts = load_pretrained(path)
    _same_outputs(parts.unet, unet, parts.autoencoder, vae, unet_kwargs["context_dim"])
    _assert_close(parts.build_conditioner()([PROMPT])[0], context)
    config, state = load_unet_state(path)
    assert config == parts.unet_config and state.keys() == unet.state_dict().keys()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_bare_single_file_infers_family(family, tmp_path):
    """No metadata: SD1 (context 768, conv) gets 8 heads, SD2 (context 1024, linear) 64-wide heads."""
    config = dict(UNET_PRESETS[family], model_channels=64, channel_mult=[1, 2], attention_resolutions=[2, 1])
    unet = _perturb(UNetModel(**config))
    vae = _perturb(AutoencoderKL(**VAE_SMALL))
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state.update({"first_stage_model." + k: v.contiguous() for k, v in vae.state_dict().items()})
    # The EMA copy as CompVis' LitEma stores it (module path without dots), and the schedule buffers.
    ema_unet = _perturb(UNetModel(**config))
    state.update({ema_key(k): v for k, v in ema_unet.state_dict().items()})
    state.update({"betas": NoiseSchedule().betas, "model_ema.num_updates": torch.tensor(0)})
    path = tmp_path / "bare.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)

    parts = load_pretrained(path)
    assert parts.family == family
    assert {k: parts.unet_config[k] for k in config} == config
    assert parts.schedule_config["beta_schedule"] == "scaled_linear"
    assert "betas" in parts.ignored_keys and "model_ema.num_updates" in parts.ignored_keys
    _same_outputs(parts.unet, unet, parts.autoencoder, vae, config["context_dim"])
    x, t, context = _unet_inputs(config["context_dim"])
    with torch.no_grad():
        _assert_close(load_pretrained(path, ema=True).unet(x, t, context), ema_unet(x, t, context))


# ------------------------------------------------------------------------------------------- errors


def _small_file(tmp_path, style: str = "sd1"):
    unet = UNetModel(**UNET_STYLES[style])
    path = tmp_path / "small.safetensors"
    save_single_file(path, unet=unet)
    return path


def _rewrite(path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(state, str(path), metadata=metadata)


def test_missing_key_is_named(tmp_path):
    path = _small_file(tmp_path)
    _rewrite(path, lambda s: s.pop("model.diffusion_model.out.2.bias"))
    with pytest.raises(ConversionError, match=r"missing: \[model\.diffusion_model\.out\.2\.bias\]"):
        load_pretrained(path)


def test_unmapped_key_is_named(tmp_path):
    path = _small_file(tmp_path)
    _rewrite(path, lambda s: s.update({"model.diffusion_model.extra.weight": torch.zeros(1)}))
    with pytest.raises(ConversionError, match=r"unexpected keys .*model\.diffusion_model\.extra\.weight"):
        load_pretrained(path)


def test_wrong_architecture_names_the_misfit(tmp_path):
    path = _small_file(tmp_path)
    wrong = dict(UNET_STYLES["sd1"], context_dim=48)
    with pytest.raises(ConversionError, match=r"do not fit the architecture.*attn2\.to_k\.weight.*expected \(32, 48\)"):
        load_pretrained(path, config={"unet": wrong})


def test_diffusers_missing_key_is_named(tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**diffusers_unet_kwargs(UNET_STYLES["sd2"])).save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("mid_block.attentions.0.proj_in.weight")
    save_file(state, str(weights))
    with pytest.raises(ConversionError, match=r"mid_block\.attentions\.0\.proj_in\.weight"):
        load_pretrained(tmp_path)


def test_diffusers_vae_with_pre_0_14_attention_names(tmp_path):
    """Older diffusers files name the VAE mid-block attention query/key/value/proj_attn."""
    from diffusers import AutoencoderKL as DiffusersVAE

    theirs = _perturb(DiffusersVAE(**diffusers_vae_kwargs(VAE_SMALL)))
    theirs.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    state = {}
    for key, value in load_file(str(weights)).items():
        for new_name, old_name in old.items():
            key = key.replace(f"attentions.0.{new_name}", f"attentions.0.{old_name}")
        state[key] = value
    assert any(".query." in k for k in state)
    save_file(state, str(weights))
    _compare_vae(load_pretrained(tmp_path).autoencoder, theirs)


class _RunsCode:
    """Unpickling this would call print: the kind of object a weights-only load must refuse."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": _RunsCode()}, path)
    with pytest.raises(ConversionError, match=r"refused to unpickle.*Unsupported global: GLOBAL print"):
        load_pretrained(path)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_unknown_family_asks_for_heads(tmp_path):
    unet = UNetModel(**UNET_STYLES["sd1"])
    path = tmp_path / "bare.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    with pytest.raises(ConversionError, match="number of attention heads is not stored"):
        load_pretrained(path)
    parts = load_pretrained(path, config={"unet": UNET_STYLES["sd1"]})
    x, t, context = _unet_inputs(64)
    with torch.no_grad():
        _assert_close(parts.unet(x, t, context), unet.eval()(x, t, context))
