"""diffusers models at the same architecture as ours, with our weights, as numerical oracles (ldm.convert.to_diffusers)."""

from ldm.convert.to_diffusers import diffusers_unet_from_ours, diffusers_vae_from_ours, unet_config, vae_config

__all__ = ["diffusers_unet_from_ours", "diffusers_vae_from_ours", "unet_config", "vae_config"]
