"""Our U-Net and autoencoder as diffusers models (UNet2DConditionModel, AutoencoderKL), with our weights: the peer
the benchmarks time us against, and the oracle the tests compare numbers with.

Our modules use the latent-diffusion key layout, so diffusers' own single-file converters
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``) translate our state dicts into theirs: the
converter is the oracle for the layout, and the converted model the oracle for the numbers. diffusers is a test
and benchmark dependency only (``pip install -e ".[dev]"``), imported when a model is built.
"""

from __future__ import annotations

import torch


def unet_config(unet_kwargs: dict) -> dict:
    """diffusers UNet2DConditionModel kwargs equivalent to our UNetModel kwargs."""
    mc = unet_kwargs.get("model_channels", 320)
    mult = list(unet_kwargs.get("channel_mult", (1, 2, 4, 4)))
    attn = set(unet_kwargs.get("attention_resolutions", (4, 2, 1)))
    channels = [mc * m for m in mult]
    has_attn = [2**level in attn for level in range(len(mult))]
    head_dim = unet_kwargs.get("head_dim")
    num_heads = unet_kwargs.get("num_heads", 8)
    heads = [c // head_dim for c in channels] if head_dim else [num_heads] * len(channels)
    return dict(
        sample_size=None,
        in_channels=unet_kwargs.get("in_channels", 4),
        out_channels=unet_kwargs.get("out_channels", 4),
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        layers_per_block=unet_kwargs.get("num_res_blocks", 2),
        cross_attention_dim=unet_kwargs.get("context_dim", 768),
        # diffusers' "attention_head_dim" is really the number of heads; pass heads explicitly.
        attention_head_dim=heads,
        use_linear_projection=unet_kwargs.get("use_linear_projection", False),
        transformer_layers_per_block=unet_kwargs.get("transformer_depth", 1),
    )


def diffusers_unet_from_ours(ours: torch.nn.Module, unet_kwargs: dict):
    # diffusers is optional (dev only): imported here, when a peer model is wanted
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    theirs = UNet2DConditionModel(**unet_config(unet_kwargs))
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, theirs.config)
    theirs.load_state_dict(converted, strict=True)
    return theirs.eval()


def vae_config(vae_kwargs: dict) -> dict:
    ch = vae_kwargs.get("ch", 128)
    mult = list(vae_kwargs.get("ch_mult", (1, 2, 4, 4)))
    return dict(
        in_channels=vae_kwargs.get("in_channels", 3),
        out_channels=vae_kwargs.get("in_channels", 3),
        down_block_types=["DownEncoderBlock2D"] * len(mult),
        up_block_types=["UpDecoderBlock2D"] * len(mult),
        block_out_channels=[ch * m for m in mult],
        layers_per_block=vae_kwargs.get("num_res_blocks", 2),
        latent_channels=vae_kwargs.get("z_channels", 4),
        # diffusers has one group count for every width: ours must be built with norm_group_channels=1 to match
        # it below 128 channels (at 128 and up the default gives the same 32 groups).
        norm_num_groups=vae_kwargs.get("norm_groups", 32),
    )


def diffusers_vae_from_ours(ours: torch.nn.Module, vae_kwargs: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs = AutoencoderKL(**vae_config(vae_kwargs))
    checkpoint = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, theirs.config), strict=True)
    return theirs.eval()
