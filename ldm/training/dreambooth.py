"""DreamBooth (Ruiz et al. 2023): fine-tune a text-to-image model on a few images of one subject, with a
prior-preservation loss that keeps the model able to draw the subject's class.

    batch = [instance examples | class examples]          (ldm.data.dreambooth)
    loss  = MSE(instance) + prior_loss_weight · MSE(class)

Each term is the mean of its own examples' denoising losses, reduced in float32, as in diffusers'
train_dreambooth.py. Everything else (the denoising objective, EMA, LoRA, checkpoints) is stage 2's.
"""

from __future__ import annotations

import torch

from ldm.training.diffusion_module import DiffusionModule


def prior_preservation_loss(per_sample: torch.Tensor, num_instance: int, prior_loss_weight: float) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, instance loss, prior loss or None) from per-sample losses (B,) whose first ``num_instance``
    belong to instance examples and the rest to class examples."""
    per_sample = per_sample.float()
    if not 0 < num_instance <= per_sample.shape[0]:
        raise ValueError(f"num_instance must lie in [1, {per_sample.shape[0]}], got {num_instance}")
    instance = per_sample[:num_instance].mean()
    if num_instance == per_sample.shape[0]:
        return instance, instance, None
    prior = per_sample[num_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior


class DreamBoothModule(DiffusionModule):
    """A stage-2 module whose loss splits each batch into its instance and class examples.

    prior_loss_weight: the weight of the class examples' loss (1.0 in the paper and in diffusers).
    Checkpoints are ordinary stage-2 checkpoints: sample.py, the pipeline and init_from read them as such.
    """

    requires_source = True  # DreamBooth fine-tunes a trained model (init_from)

    def __init__(self, model, prior_loss_weight: float = 1.0, **kwargs):
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {prior_loss_weight}")
        super().__init__(model, **kwargs)
        self.prior_loss_weight = float(prior_loss_weight)
        self.save_hyperparameters({**self.hparams, "prior_loss_weight": self.prior_loss_weight})

    def training_loss(self, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, dict]:
        per_sample, stats = super().training_loss(batch, reduction="none")
        num_instance = int(batch.get("num_instance", per_sample.shape[0]))
        loss, instance, prior = prior_preservation_loss(per_sample, num_instance, self.prior_loss_weight)
        if self._trainer is not None:
            self.log("train/instance_loss", instance.detach(), batch_size=num_instance)
            if prior is not None:
                self.log("train/prior_loss", prior.detach(), batch_size=per_sample.shape[0] - num_instance)
        return loss, stats
