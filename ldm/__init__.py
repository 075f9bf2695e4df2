"""Latent diffusion: autoencoder, conditioned U-Net, noise schedules and samplers."""
__version__ = "0.1.0"
