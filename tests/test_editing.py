"""Attention maps, Prompt-to-Prompt and Attend-and-Excite on a tiny random-weight text-to-image model."""

import math

import pytest
import torch

from ldm.conditioning.text import FrozenOpenCLIPTextEncoder
from ldm.diffusion.schedule import NoiseSchedule
from ldm.editing import (
    AttendExcite,
    AttentionController,
    ControllerChain,
    CrossAttentionStore,
    PromptToPromptController,
    attend_and_excite,
    attention_figure,
    default_attention_grid,
    gaussian_kernel,
    generate_with_attention_maps,
    global_alignment,
    prompt_to_prompt,
    replacement_mapper,
    save_attention_figure,
    save_edit_figure,
    select_layers,
    token_indices,
    use_controller,
)
from ldm.editing.prompt_to_prompt import cross_replace_alphas
from ldm.model import LatentDiffusion
from ldm.modules.attention import math_attention
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from ldm.pipeline import LatentDiffusionPipeline

PROMPT = "a cat and a dog"
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These tensors are tiny: a second intra-op thread only adds synchronisation, which costs seconds per
    # call when the cores are shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    unet = UNetModel(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=2,
        context_dim=256,
    )
    with torch.no_grad():
        # The zero-initialised output convolutions would hide the transformers (and so every edit).
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    conditioner = FrozenOpenCLIPTextEncoder(arch="ViT-S-32-alt")
    return LatentDiffusionPipeline(LatentDiffusion(unet, vae, conditioner, NoiseSchedule()), image_size=16)  # 4×8×8


# ---------------------------------------------------------------------------------------------- tokens, layout


def test_long_prompt_chunk_layout_and_negative_padding(pipe):
    conditioner = pipe.conditioner
    prompt = " ".join(["cat"] * 99 + ["dog"])
    assert len(conditioner.tokenizer.encode(prompt)) == 100
    tokens, _, _ = conditioner.tokenize_chunks([prompt])  # (1, 2, 77)
    assert tokens.shape == (1, 2, 77)
    for chunk, n_content in zip(tokens[0], (75, 25)):
        assert chunk[0] == conditioner.bos_id
        assert chunk[n_content + 1] == conditioner.eos_id
        assert (chunk[1 : n_content + 1] != conditioner.eos_id).all()
    context, mask, uncond, uncond_mask = pipe.encode_prompts([prompt], [""])
    assert context.shape == (1, 154, 256) and uncond.shape == (1, 154, 256)
    assert mask.shape == uncond_mask.shape == (1, 154)
    assert mask[0].sum() == 77 + 27  # BOS, 75 tokens, EOS; BOS, 25 tokens, EOS
    assert uncond_mask[0, :2].all() and not uncond_mask[0, 2:].any()  # "" is BOS, EOS; its padding chunk is masked
    # Words are found in every chunk, at their context position.
    assert token_indices(conditioner, prompt, ["dog"]) == [77 + 25]
    assert token_indices(conditioner, prompt, [5, "dog"]) == [5, 102]


def test_token_indices(pipe):
    conditioner = pipe.conditioner
    assert token_indices(conditioner, PROMPT, ["cat", "dog"]) == [2, 5]
    assert token_indices(conditioner, PROMPT, "a") == [1, 4]  # every occurrence
    assert token_indices(conditioner, "a Cat", ["cat"]) == [2]
    multi = "a photograph of an axolotl"
    positions = token_indices(conditioner, multi, ["axolotl"])
    labels = conditioner.token_strings(multi)
    assert "".join(labels[p] for p in positions) == "axolotl"
    with pytest.raises(ValueError, match="not in the prompt"):
        token_indices(conditioner, PROMPT, ["horse"])
    with pytest.raises(ValueError, match="outside"):
        token_indices(conditioner, PROMPT, [77])


def test_global_alignment_and_replacement_mapper(pipe):
    assert global_alignment([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]
    assert global_alignment([1, 2, 3], [1, 3]) == [0, 2]
    assert global_alignment([4, 5], [4, 5]) == [0, 1]
    conditioner = pipe.conditioner
    source, target = "a cat sitting", "a axolotl sitting"
    mapper, alphas = replacement_mapper(conditioner, source, target, num_chunks=1)
    n_new = len(conditioner.tokenizer.encode("axolotl"))
    assert n_new > 1
    new_positions = list(range(2, 2 + n_new))
    assert torch.allclose(mapper[2, new_positions], torch.full((n_new,), 1 / n_new))  # 1/len(target tokens)
    assert mapper[3, 2 + n_new] == 1  # "sitting" follows the shift
    assert mapper[0, 0] == 1 and alphas.eq(1).all()
    with pytest.raises(ValueError, match="same number of words|one for one"):
        replacement_mapper(conditioner, "a cat", "a big cat", num_chunks=1)


# ---------------------------------------------------------------------------------------------- controllers


class _RecordProbs(AttentionController):
    def __init__(self, num_prompts):
        super().__init__(num_prompts)
        self.probs = {}

    def __call__(self, probs, attn):
        self.probs[attn.name] = probs.clone()
        return probs


def test_hook_sees_the_math_path_probabilities(pipe):
    unet = pipe.unet
    grid = default_attention_grid(unet, (8, 8))
    assert grid == (8, 8)  # the latent-resolution level: the largest grid ≤ 16 on this model
    assert default_attention_grid(unet, (32, 32)) == (16, 16)  # 32 and 16 on the down/up paths, 16 in the mid
    assert default_attention_grid(unet, (64, 64)) == (32, 32)  # nothing ≤ 16 outside the mid block: the smallest
    expected_names = ["input_blocks.1.1.transformer_blocks.0.attn2", "output_blocks.2.1.transformer_blocks.0.attn2",
                      "output_blocks.3.1.transformer_blocks.0.attn2"]
    assert [layer.name for layer in select_layers(unet, (8, 8), cross=True, grid=grid)] == expected_names
    cross_8x8 = [layer for layer in unet.attention_layers() if layer.is_cross and "middle" not in layer.name]
    qkv = {}

    def capture(layer, part):
        def hook(module, inputs, output):
            qkv.setdefault(layer.name, {})[part] = output.detach().clone()
        return hook

    handles = [getattr(layer, part).register_forward_hook(capture(layer, part))
               for layer in cross_8x8 for part in ("to_q", "to_k", "to_v")]
    context, mask, uncond, uncond_mask = pipe.encode_prompts([PROMPT], [""])
    x = torch.randn(2, 4, 8, 8)
    store, recorder = CrossAttentionStore(grid, num_prompts=1), _RecordProbs(num_prompts=1)
    try:
        with torch.no_grad(), use_controller(unet, ControllerChain(recorder, store)):
            unet(x, torch.tensor([500, 500]), context=torch.cat([uncond, context]),
                 context_mask=torch.cat([uncond_mask, mask]))
    finally:
        for handle in handles:
            handle.remove()

    references = []
    for layer in cross_8x8:
        q, k, v = (qkv[layer.name][p] for p in ("to_q", "to_k", "to_v"))
        if q.shape[1] != 64:
            continue
        _, probs = math_attention(q, k, v, layer.heads, torch.cat([uncond_mask, mask]))  # (2, heads, 64, 77)
        assert torch.equal(recorder.probs[layer.name], probs), layer.name
        references.append(probs[1])  # the conditional row
    assert len(references) == 3  # input_blocks.1, output_blocks.2 and output_blocks.3
    expected = torch.stack(references).mean(dim=(0, 1)).reshape(8, 8, 77)
    torch.testing.assert_close(store.maps()[0], expected, atol=1e-6, rtol=1e-6)
    # Leaving the block removes every trace: the fast path is back.
    assert all(layer.controller is None for layer in unet.attention_layers())
    assert not unet._forward_pre_hooks


def test_shared_noise_sampling_is_generate(pipe):
    ours = pipe.generate([PROMPT], shared_noise=True, steps=STEPS, seed=5, sampler="euler_a")
    theirs = pipe.generate(PROMPT, steps=STEPS, seed=5, sampler="euler_a")
    assert torch.equal(ours.latents, theirs.latents)


# ---------------------------------------------------------------------------------------------- attention maps


def test_attention_maps(pipe, tmp_path):
    result, maps, labels = generate_with_attention_maps(pipe, PROMPT, steps=STEPS, seed=1, keep="all")
    assert maps.shape == (77, 8, 8) and len(labels) == 77
    assert labels[:7] == ["<start_of_text>", "a", "cat", "and", "a", "dog", "<end_of_text>"]
    torch.testing.assert_close(maps.sum(0), torch.ones(8, 8), atol=1e-5, rtol=0)
    assert maps[7:].abs().max() == 0  # masked padding gets no attention

    _, content, content_labels = generate_with_attention_maps(pipe, PROMPT, steps=STEPS, seed=1)
    assert content_labels == ["a", "cat", "and", "a", "dog"]
    torch.testing.assert_close(content, maps[1:6])

    _, late, _ = generate_with_attention_maps(pipe, PROMPT, steps=STEPS, seed=1, step_window=(0.5, 1.0), keep="all")
    torch.testing.assert_close(late.sum(0), torch.ones(8, 8), atol=1e-5, rtol=0)
    assert not torch.allclose(late, maps)

    path = save_attention_figure(tmp_path, 3, result, content, content_labels)
    assert path.name == "attention_3.png" and path.stat().st_size > 0
    figure = attention_figure(result.images[0], content, content_labels, cell_size=32)
    assert figure.size == (6 * 32, 32 + 16)


# ---------------------------------------------------------------------------------------------- Prompt-to-Prompt


@pytest.mark.parametrize("edit,sampler", [("replace", "ddim"), ("refine", "ddim"), ("replace", "euler_a")])
def test_prompt_to_prompt_identity_edit_reproduces_source(pipe, edit, sampler):
    result = prompt_to_prompt(pipe, PROMPT, PROMPT, edit=edit, steps=STEPS, seed=2, sampler=sampler,
                              cross_replace_steps=1.0, self_replace_steps=1.0)
    assert torch.equal(result.latents[0], result.latents[1])
    assert result.prompts == [PROMPT, PROMPT]


def test_prompt_to_prompt_source_row_is_plain_generation_and_edit_differs(pipe, tmp_path):
    result = prompt_to_prompt(pipe, PROMPT, "a tiger and a dog", steps=STEPS, seed=2)
    plain = pipe.generate(PROMPT, steps=STEPS, seed=2)
    # Same seed, same procedure; the controller only changes the math backend's rounding on the source row.
    torch.testing.assert_close(result.latents[:1], plain.latents, atol=1e-4, rtol=1e-4)
    assert (result.latents[1] - result.latents[0]).abs().max() > 1e-3
    path = save_edit_figure(tmp_path, 0, result)
    assert path.name == "edit_0.png" and path.exists()


class _Layer:
    def __init__(self, is_cross):
        self.is_cross, self.name = is_cross, "stub"


def test_prompt_to_prompt_controller_edits_the_target_row_only(pipe):
    source, target = "a cat sitting", "a axolotl sitting"
    mapper, alphas = replacement_mapper(pipe.conditioner, source, target, num_chunks=1)
    n_new = len(pipe.conditioner.tokenizer.encode("axolotl"))
    steps = 10
    controller = PromptToPromptController(
        mapper, alphas, cross_replace_alphas(steps, 77, (0.0, 0.5)), self_steps=(2, 4)
    )
    probs = torch.rand(4, 2, 16, 77).softmax(-1)  # guided batch [uncond_src, uncond_tgt, src, tgt]
    controller.step = 0
    out = controller(probs, _Layer(is_cross=True))
    assert torch.equal(out[:3], probs[:3])
    torch.testing.assert_close(out[3, :, :, 2 + n_new], probs[2, :, :, 3])  # "sitting" ← source "sitting"
    for k in range(n_new):  # each axolotl token ← cat / n_new
        torch.testing.assert_close(out[3, :, :, 2 + k], probs[2, :, :, 2] / n_new)
    controller.step = 5  # ⌊0.5·(10 + 1)⌋ = 5: the window is over
    assert torch.equal(controller(probs, _Layer(is_cross=True)), probs)

    self_probs = torch.rand(4, 2, 16, 16).softmax(-1)
    for step, replaced in [(1, False), (2, True), (3, True), (4, False)]:
        controller.step = step
        out = controller(self_probs, _Layer(is_cross=False))
        assert torch.equal(out[3], self_probs[2] if replaced else self_probs[3])
    controller.step = 2
    large = torch.rand(4, 2, 17 * 17, 17 * 17).softmax(-1)  # more than 16² queries: left alone
    assert torch.equal(controller(large, _Layer(is_cross=False)), large)
    # Without guidance the conditional rows are the whole batch.
    assert torch.equal(controller(self_probs[2:], _Layer(is_cross=False))[1], self_probs[2])


def test_reweight_by_one_changes_nothing(pipe):
    same = prompt_to_prompt(pipe, PROMPT, PROMPT, edit="reweight", edit_words=["cat"], edit_weight=1.0,
                            steps=STEPS, seed=2)
    assert torch.equal(same.latents[0], same.latents[1])
    target = "a fluffy cat and a dog"
    windows = {"cross_replace_steps": 0.8, "self_replace_steps": 0.4, "steps": STEPS, "seed": 2}
    reweighted = prompt_to_prompt(pipe, PROMPT, target, edit="reweight", edit_words=["cat"], edit_weight=1.0,
                                  **windows)
    refined = prompt_to_prompt(pipe, PROMPT, target, edit="refine", **windows)
    assert torch.equal(reweighted.latents, refined.latents)
    # …and a real factor does change the image.
    stronger = prompt_to_prompt(pipe, PROMPT, PROMPT, edit="reweight", edit_words=["cat"], edit_weight=5.0,
                                steps=STEPS, seed=2)
    assert (stronger.latents[1] - stronger.latents[0]).abs().max() > 1e-3


def test_local_blend_keeps_source_outside_mask(pipe):
    result = prompt_to_prompt(pipe, PROMPT, "a tiger and a dog", steps=STEPS, seed=2, blend_words=["cat", "tiger"],
                              blend_threshold=0.99)
    same = (result.latents[0] == result.latents[1]).all(dim=0)  # (8, 8) pixels copied from the source
    assert same.any() and not same.all()


# ---------------------------------------------------------------------------------------------- Attend-and-Excite


def test_gaussian_kernel_weights():
    kernel = gaussian_kernel(3, 0.5)
    torch.testing.assert_close(kernel[1], torch.tensor([0.212, 0.576, 0.212]) * 0.576, atol=1e-3, rtol=0)
    assert math.isclose(kernel.sum().item(), 1.0, rel_tol=1e-6)


def test_attend_excite_update_lowers_the_loss(pipe):
    context, mask, _, _ = pipe.encode_prompts([PROMPT], [""])
    excite = AttendExcite(pipe.unet, context, mask, token_indices(pipe.conditioner, PROMPT, ["cat", "dog"]), (8, 8),
                          num_steps=STEPS)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.enable_grad():
        z = z.requires_grad_(True)
        before = excite.loss(z, t)
        z_new = excite.update(z, before, step_size=excite.step_sizes[0])
        after = excite.loss(z_new.detach(), t)
    assert 0 < before.item() <= 1
    assert after.item() < before.item()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "euler_a"])
def test_attend_and_excite_end_to_end(pipe, sampler):
    kwargs = {"steps": 3, "seed": 0, "sampler": sampler, "cfg_scale": 7.5}
    result, losses = attend_and_excite(pipe, PROMPT, ["cat", "dog"], max_iter_to_alter=2, thresholds={0: 0.99},
                                       max_refinement_steps=1, **kwargs)
    plain = pipe.generate(PROMPT, **kwargs)
    assert len(losses) == 2 and all(0 <= loss <= 1 for loss in losses)
    assert torch.isfinite(result.images).all() and result.images.shape == (1, 3, 16, 16)
    assert (result.latents - plain.latents).abs().max() > 1e-4  # the latent was moved
