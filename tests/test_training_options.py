"""Stage-2 training options, in-process on a tiny model (tests/tiny_ldm.py): precision, non-finite losses and
weights, the training recipe (prediction type, min-SNR, offset noise, zero-terminal SNR, EMA, LR schedule,
gradient accumulation), torch.compile, and resuming (RNG states, atomic and safe checkpoint files, export)."""

from __future__ import annotations

import math
import pickle
import types

import lightning as L
import pytest
import tiny_ldm as T
import torch

from ldm.training.callbacks import FiniteWeightsGuard
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.weights_io import CheckpointError


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    return T.autoencoder_ckpt(tmp_path_factory.mktemp("ae"))


class Record(L.Callback):
    """Per training batch: global step, loss, learning rate."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.rows.append({"step": trainer.global_step, "loss": None if loss is None else float(loss),
                          "lr": trainer.optimizers[0].param_groups[0]["lr"]})


def unet_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.unet.state_dict().items()}


# -- precision ------------------------------------------------------------------------------------------------


def test_bf16_mixed_step_keeps_trainable_weights_fp32(ae, tmp_path):
    module = T.module(ae)
    seen = []
    module.unet.out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    T.trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(module, T.Data())
    assert seen == [torch.bfloat16]  # the U-Net ran under autocast ...
    assert all(p.dtype == torch.float32 for p in module.unet.parameters())  # ... its weights stayed fp32
    assert all(p.dtype == torch.float32 for p in module.ema.model.parameters())
    state = module.trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())


class GradNorms(L.Callback):
    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def _stage(ae, stage: str):
    if stage == "diffusion":
        return T.module(ae, optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "fused": True})
    from ldm.training.autoencoder_module import AutoencoderModule

    return AutoencoderModule(autoencoder=T.AUTOENCODER, loss={"kl_weight": 1e-6}, lr=1e-3, fused_optimizer=True)


@pytest.mark.parametrize("stage", ["diffusion", "autoencoder"])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_fused_adamw_clips_under_every_precision(ae, tmp_path, stage, precision):
    # trainer=gpu is bf16-mixed with the default fused AdamW and gradient_clip_val=1.0; Lightning refuses to clip
    # for an optimizer that unscales inside its step (it stopped at the first step). Under 16-mixed the gradient
    # scaler multiplies the loss by 65,536: the norm must be measured, clipped and logged unscaled.
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = _stage(ae, stage)
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    record = GradNorms()
    # Lightning turns precision="16-mixed" into bf16 on the CPU; a plugin with a GradScaler keeps fp16 and scaling.
    options = ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))]}
               if precision == "16-mixed" else {"precision": precision})
    # The scaler halves its scale after each overflowing step: the autoencoder's summed loss needs ~12 of them.
    steps = 16 if precision == "16-mixed" else 3
    trainer = T.trainer(tmp_path, max_steps=steps, gradient_clip_val=1.0, callbacks=[record], **options)
    trainer.fit(module, T.Data())  # the same batch every step
    assert trainer.optimizers[0].defaults["fused"]
    after = [p for p in module.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # it trained
    torch.manual_seed(0)
    reference = GradNorms()
    T.trainer(tmp_path, max_steps=1, gradient_clip_val=1.0, callbacks=[reference]).fit(_stage(ae, stage), T.Data())
    # The first update's gradient norm, unscaled: as in fp32 up to the precision's rounding (not 65,536 times it).
    # Steps that overflow (the scaler calibrating) log a non-finite norm and change nothing.
    finite = [n for n in record.norms if math.isfinite(n)]
    assert finite and finite[0] == pytest.approx(reference.norms[0], rel=0.1)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autoencoder_precision_encodes_in_its_own_dtype(ae, precision, dtype):
    reference = T.module(ae, sample_posterior=False)
    module = T.module(ae, sample_posterior=False, autoencoder_precision=precision)
    assert all(p.dtype == dtype for p in module.autoencoder.parameters())
    images = T.batch()["image"]
    seen = []
    module.autoencoder.quant_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    # Under the trainer's bf16 autocast, the autoencoder still runs in its own dtype (autocast is off there).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = module.encode_images(images)
    assert seen == [dtype] and z.dtype == torch.float32
    torch.testing.assert_close(z, reference.encode_images(images), rtol=0.05, atol=0.05)
    # An fp32 autoencoder is untouched by autocast: the same latents with and without it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z32 = reference.encode_images(images)
    assert torch.equal(z32, reference.encode_images(images))
    decoded = module.autoencoder.decode_from_latent(z)  # sampling decodes in the autoencoder's dtype too
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


def test_bad_precision_names_are_one_line_errors(ae):
    with pytest.raises(ValueError, match="autoencoder_precision must be one of"):
        T.module(ae, autoencoder_precision="half")
    with pytest.raises(ValueError, match="noise_seeding must be one of"):
        T.module(ae, noise_seeding="random")



def test_an_optimizer_without_the_default_arguments_is_a_one_line_error(ae):
    # configs/model/ldm.yaml sets AdamW's fused=true; RMSprop has no such argument.
    module = T.module(ae, optimizer={"_target_": "torch.optim.RMSprop", "_partial_": True, "lr": 1e-3, "fused": True})
    module.trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    with pytest.raises(ValueError, match=r"model.optimizer: torch.optim.RMSprop .*'fused'.*~model.optimizer.fused"):
        module.configure_optimizers()
    # without it the same optimizer builds
    module = T.module(ae, optimizer={"_target_": "torch.optim.RMSprop", "_partial_": True, "lr": 1e-3})
    module.trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    assert isinstance(module.configure_optimizers()["optimizer"], torch.optim.RMSprop)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradients_are_clipped_with_fused_adamw_under_bf16(ae, precision, tmp_path):
    """Gradient clipping (the trainer's default) with torch's fused AdamW (the default optimizer) under bf16-mixed
    trains and clips: Lightning's own mixed-precision clipping refuses fused optimizers even with no loss scaler."""

    class GradNorms(L.Callback):  # after the optimizer step the clipped gradients are still in place
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad.norm() for p in pl_module.trainable_parameters() if p.grad is not None]
            self.values.append(float(torch.stack(grads).norm()))

    norms = GradNorms()
    optimizer = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "fused": True}
    module = T.module(ae, optimizer=optimizer)
    T.trainer(tmp_path, max_steps=2, precision=precision, gradient_clip_val=1e-3, callbacks=[norms]).fit(
        module, T.Data())
    assert len(norms.values) == 2 and all(0 < n <= 1e-3 * (1 + 1e-4) for n in norms.values), norms.values


# -- non-finite losses and weights ----------------------------------------------------------------------------


class NaNOnce(torch.utils.data.IterableDataset):
    """good, NaN, good batches: the middle one makes the loss NaN."""

    def __iter__(self):
        for k in range(3):
            batch = T.batch()
            if k == 1:
                batch["image"][0] = float("nan")
            yield batch

    def __len__(self):
        return 3


class NaNData(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(NaNOnce(), batch_size=None)


class Snapshots(L.Callback):
    def __init__(self):
        self.before = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(unet_state(pl_module))


def test_nonfinite_loss_skip_drops_the_update(ae, tmp_path):
    module = T.module(ae, nonfinite_loss="skip")
    snapshots = Snapshots()
    T.trainer(tmp_path, max_epochs=1, max_steps=-1, callbacks=[snapshots]).fit(module, NaNData())
    assert module.skipped_nonfinite == 1
    after = unet_state(module)
    # batch 0 trained, batch 1 (NaN) changed nothing, batch 2 trained again
    assert any(not torch.equal(snapshots.before[0][k], snapshots.before[1][k]) for k in after)
    assert all(torch.equal(snapshots.before[1][k], snapshots.before[2][k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_nonfinite_loss_raise_stops_the_run(ae, tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss .* model.nonfinite_loss=skip"):
        T.trainer(tmp_path, max_epochs=1, max_steps=-1).fit(T.module(ae), NaNData())


class PoisonAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.unet.out[-1].weight[0, 0, 0, 0] = float("nan")


def test_nan_weights_never_replace_the_last_good_checkpoint(ae, tmp_path):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1,
                                                      save_last=True, save_top_k=0)
    trainer = T.trainer(tmp_path, max_steps=4, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                        callbacks=[PoisonAt(step=2), FiniteWeightsGuard(), checkpoints])
    with pytest.raises(FloatingPointError, match="refusing to save a checkpoint at step 2: non-finite weights"):
        trainer.fit(T.module(ae), T.Data())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


# -- the training recipe, through the module --------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type, min_snr_gamma, offset_noise", [
    ("eps", None, 0.0), ("v", None, 0.0), ("eps", 5.0, 0.0), ("v", 5.0, 0.1)])
def test_training_loss_matches_a_hand_computation(ae, monkeypatch, prediction_type, min_snr_gamma, offset_noise):
    from ldm.training.rng import sample_generators

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    module = T.module(ae, prediction_type=prediction_type, min_snr_gamma=min_snr_gamma, offset_noise=offset_noise,
                      noise_seeding="per_sample").train()
    batch = T.batch()
    loss, _ = module.training_loss(batch)

    # The reference draws what the module draws, from the same per-sample generators, in the same order.
    generators = sample_generators(batch["key"], "7", 0)
    posterior = module.autoencoder.encode(batch["image"])
    context, mask = module.conditioner(batch["caption"])
    alphas_cumprod = module.schedule.alphas_cumprod
    losses = []
    for i, g in enumerate(generators):
        z0 = (posterior.mean[i] + posterior.std[i] * torch.randn(posterior.mean.shape[1:], generator=g))
        z0 = z0 * module.autoencoder.scale_factor
        t = torch.randint(0, 1000, (1,), generator=g)
        eps = torch.randn((1, *z0.shape), generator=g)
        if offset_noise:
            eps = eps + offset_noise * torch.randn((1, z0.shape[0], 1, 1), generator=g)
        a = alphas_cumprod[t].view(1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = eps if prediction_type == "eps" else a.sqrt() * eps - (1 - a).sqrt() * z0
        mse = (module.unet(x_t, t, context[i : i + 1], mask[i : i + 1]) - target).pow(2).mean()
        snr = a / (1 - a)
        weight = 1.0
        if min_snr_gamma is not None:
            weight = torch.clamp(snr, max=min_snr_gamma) / (snr if prediction_type == "eps" else snr + 1)
        losses.append(weight * mse)
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_and_trailing_spacing_through_config(ae):
    diffusers = pytest.importorskip("diffusers")
    module = T.module(ae, prediction_type="v", schedule={"zero_terminal_snr": True},
                      sampling={"image_size": T.SIZE, "steps": 4, "sampler": "ddim",
                                "sampler_options": {"timestep_spacing": "trailing"}})
    assert float(module.schedule.alphas_cumprod[-1]) == 0.0  # the last step is pure noise
    oracle = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     rescale_betas_zero_snr=True)
    torch.testing.assert_close(module.schedule.alphas_cumprod, oracle.alphas_cumprod.float(), rtol=1e-4, atol=1e-6)
    from ldm.pipeline import LatentDiffusionPipeline

    seen = []
    module.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].flatten()[0])))
    LatentDiffusionPipeline.from_module(module.eval(), use_ema=False).generate(["1"], cfg_scale=1.0, seed=0)
    ddim = diffusers.DDIMScheduler(timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ddim.set_timesteps(4)
    assert seen == ddim.timesteps.tolist() == [999, 749, 499, 249]


def test_ema_start_step_and_update_interval(ae, tmp_path):
    module = T.module(ae, ema={"decay": 0.9, "start_step": 2, "update_every": 2, "warmup": False})

    class AtStep2(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # the first update (at step 2) copied the weights; later ones average
                self.equal = all(torch.equal(a, b) for a, b in zip(pl_module.unet.parameters(),
                                                                   pl_module.ema.model.parameters()))

    probe = AtStep2()
    T.trainer(tmp_path, max_steps=6, callbacks=[probe]).fit(module, T.Data())
    assert int(module.ema.num_updates) == 3  # steps 2, 4, 6
    assert probe.equal
    assert not all(torch.equal(a, b) for a, b in zip(module.unet.parameters(), module.ema.model.parameters()))


def test_gradient_accumulation_steps_schedule_and_ema_follow_optimizer_steps(ae, tmp_path):
    module = T.module(ae, lr_schedule={"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1})
    record = Record()
    trainer = T.trainer(tmp_path, max_steps=5, accumulate_grad_batches=2, callbacks=[record])
    trainer.fit(module, T.Data())
    from ldm.training.lr_schedule import lr_multiplier

    assert len(record.rows) == 10 and trainer.global_step == 5  # two batches per optimizer step
    assert int(module.ema.num_updates) == 5
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 5
    assert all(s["step"] == 5 for s in trainer.optimizers[0].state.values())
    # the learning rate after each optimizer step is the schedule's at that step (total = max_steps)
    for row in record.rows[1::2]:
        assert row["lr"] == pytest.approx(1e-3 * lr_multiplier(row["step"], "cosine", 2, 5, 0.1))


# -- torch.compile --------------------------------------------------------------------------------------------


def test_compiled_unet_keeps_state_dict_keys_and_resumes(ae, tmp_path):
    plain = T.module(ae)
    # The eager backend traces with TorchDynamo without generating code: seconds instead of minutes here.
    module = T.module(ae, compile={"backend": "eager"})
    assert list(module.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert "compile" not in module.hparams  # sampling from the checkpoint does not compile
    trainer = T.trainer(tmp_path, max_steps=2)
    trainer.fit(module, T.Data())
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    saved = torch.load(tmp_path / "compiled.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in saved["state_dict"])
    resumed = T.module(ae, compile={"backend": "eager"})
    T.trainer(tmp_path, max_steps=3).fit(resumed, T.Data(), ckpt_path=tmp_path / "compiled.ckpt")
    assert resumed.global_step == 3 and int(resumed.ema.num_updates) == 3


@pytest.mark.slow
def test_inductor_compiled_unet_resumes(ae, tmp_path):
    module = T.module(ae, compile=True)
    trainer = T.trainer(tmp_path, max_steps=2)
    trainer.fit(module, T.Data())
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    resumed = T.module(ae, compile=True)
    T.trainer(tmp_path, max_steps=3).fit(resumed, T.Data(), ckpt_path=tmp_path / "compiled.ckpt")
    assert resumed.global_step == 3


# -- resuming -------------------------------------------------------------------------------------------------


def test_resume_restores_rng_so_the_next_steps_draw_the_same(ae, tmp_path):
    def run(max_steps, ckpt_path=None, seed=0):
        record = Record()
        trainer = T.trainer(tmp_path, max_steps=max_steps, callbacks=[record], plugins=[AtomicCheckpointIO()])
        L.seed_everything(seed, verbose=False)  # torch, numpy and Python (caption dropout) alike
        # a cosine schedule over max_steps (estimated_stepping_batches): the resumed run must restore its position
        module = T.module(ae, ucg_rate=0.5, lr_schedule={"kind": "cosine", "warmup_steps": 1})
        trainer.fit(module, T.Data(), ckpt_path=ckpt_path)
        return trainer, [(r["loss"], r["lr"]) for r in record.rows]

    full, continuous = run(4)
    trainer, first = run(2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    assert [loss for loss, _ in first] == [loss for loss, _ in continuous[:2]]  # (its LR schedule ends at step 2)
    ckpt = torch.load(tmp_path / "two.ckpt", weights_only=True)
    assert len(ckpt["rng_states"]) == 1 and set(ckpt["rng_states"][0]) >= {"torch", "numpy", "python"}
    after, resumed = run(4, tmp_path / "two.ckpt")
    # bit for bit: weights, EMA, optimizer, LR schedule, and the draws of t, noise and caption dropout
    assert resumed == continuous[2:]
    a, b = full.lightning_module.state_dict(), after.lightning_module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("unet.", "ema.")))
    # Without the RNG states the resumed steps draw other t and noise: the check above can fail.
    del ckpt["rng_states"]
    torch.save(ckpt, tmp_path / "no_rng.ckpt")
    _, unrestored = run(4, tmp_path / "no_rng.ckpt", seed=123)
    assert [loss for loss, _ in unrestored] != pytest.approx([loss for loss, _ in continuous[2:]], rel=1e-6)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


class Payload:
    """A pickled object: loading it would run this class's code, so weights_only refuses it."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_resume_refuses_a_checkpoint_that_would_run_code(ae, tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {}, "payload": Payload()}, f, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # asked for unsafe loading: refused
    trainer = T.trainer(tmp_path, max_steps=1, plugins=[AtomicCheckpointIO()])
    with pytest.raises(CheckpointError, match="cannot resume from"):
        trainer.fit(T.module(ae), T.Data(), ckpt_path=path)


def test_export_holds_inference_weights_only_and_samples_the_same(ae, tmp_path):
    from ldm.export import export, load_export
    from ldm.pipeline import LatentDiffusionPipeline

    trainer = T.trainer(tmp_path, max_steps=2)
    trainer.fit(T.module(ae), T.Data())
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    info = export(tmp_path / "full.ckpt", tmp_path / "export")
    assert info["unet_weights"] == "ema" and info["bytes"] < info["checkpoint_bytes"] / 2
    exported = load_export(tmp_path / "export")
    keys = set(exported["state_dict"])
    assert not any(k.startswith("ema.") for k in keys) and any(k.startswith("autoencoder.") for k in keys)
    assert exported["hyper_parameters"]["ema"] is None
    full = torch.load(tmp_path / "full.ckpt", weights_only=True)
    for k, v in full["state_dict"].items():
        if k.startswith("ema.model."):
            assert torch.equal(exported["state_dict"]["unet." + k[len("ema.model."):]], v)
    a = LatentDiffusionPipeline.from_checkpoint(tmp_path / "full.ckpt", use_ema=True).generate(["1", "2"], seed=3)
    b = LatentDiffusionPipeline.from_checkpoint(tmp_path / "export").generate(["1", "2"], seed=3)
    assert torch.equal(a.images, b.images)


# -- memory -----------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_lowers_measured_peak_memory():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "measure_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--batch", "4", "--steps", "1", "--threads", "1"],
                          capture_output=True, text=True, check=True, timeout=300)
    peaks = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"RESULT peak_step_memory_mb gradient_checkpointing=(on|off) .* value=([\d.]+)", proc.stdout)}
    assert set(peaks) == {"on", "off"}, proc.stdout
    # activations of 13 blocks against about one block's: well below, not merely a little
    assert peaks["on"] < 0.8 * peaks["off"], peaks
