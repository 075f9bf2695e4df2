"""Conditioners: prompt chunk layout, masks, frozen text tower, weight loading, class labels (CPU, fast)."""

import logging

import open_clip
import pytest
import torch

from ldm.conditioning import ClassLabelEncoder, Conditioner, FrozenOpenCLIPTextEncoder
from ldm.conditioning.trainable_text import TrainableOpenCLIPTextEncoder

# Smallest open_clip text tower (width 256, 10 blocks, CLIP layout); builds in about a second on CPU.
ARCH = "ViT-S-32-alt"
WIDTH = 256
L = 77  # tokens per chunk
WORD = "cat"  # one BPE token, also when repeated


def words(n: int) -> str:
    return " ".join([WORD] * n)


@pytest.fixture(scope="module")
def clip_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(ARCH, pretrained=None).eval()


@pytest.fixture(scope="module")
def weights_path(clip_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "open_clip_full.pt"
    torch.save(clip_model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(weights_path) -> FrozenOpenCLIPTextEncoder:
    return FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path)


def test_single_bpe_token_word(encoder):
    assert len(encoder.tokenizer.encode(words(200))) == 200


def test_short_prompt_layout(encoder):
    tokens, mask, dropped = encoder.tokenize_chunks(["a photo of a cat"])
    assert tokens.shape == mask.shape == (1, 1, L) and dropped == [""]
    k = len(encoder.tokenizer.encode("a photo of a cat"))  # 5
    assert tokens[0, 0, 0] == encoder.bos_id
    assert tokens[0, 0, k + 1] == encoder.eos_id
    assert (tokens[0, 0, k + 2:] == encoder.eos_id).all()  # A1111 pads with EOS
    assert mask[0, 0, : k + 2].all() and not mask[0, 0, k + 2:].any()

    context, cmask = encoder(["a photo of a cat"])
    assert context.shape == (1, L, WIDTH) and context.dtype == torch.float32
    assert cmask.shape == (1, L) and cmask.dtype == torch.bool
    assert torch.equal(cmask[0], mask[0, 0])
    assert encoder.output_dim == WIDTH


@pytest.mark.parametrize("n_tokens, n_chunks", [(75, 1), (76, 2), (150, 2), (200, 3)])
def test_long_prompt_chunks(encoder, n_tokens, n_chunks):
    prompt = words(n_tokens)
    assert encoder.num_chunks(prompt) == n_chunks
    tokens, mask, _ = encoder.tokenize_chunks([prompt])
    assert tokens.shape == (1, n_chunks, L)
    for c in range(n_chunks):
        k = min(75, n_tokens - 75 * c)  # prompt tokens in this chunk
        row = tokens[0, c]
        assert row[0] == encoder.bos_id and row[k + 1] == encoder.eos_id
        assert (row[1: k + 1] == encoder.tokenizer.encode(WORD)[0]).all()
        assert mask[0, c, : k + 2].all() and not mask[0, c, k + 2:].any()
    context, cmask = encoder([prompt])
    assert context.shape == (1, L * n_chunks, WIDTH) and cmask.shape == (1, L * n_chunks)
    assert torch.equal(cmask[0], mask[0].flatten())
    # Each chunk is encoded on its own: chunk c equals encoding its 77 tokens alone.
    for c in range(n_chunks):
        alone = encoder._encode_tokens(tokens[0, c][None])[0]
        torch.testing.assert_close(context[0, c * L:(c + 1) * L], alone)
    assert len(encoder.token_strings(prompt)) == L * n_chunks


def test_batch_padding_with_empty_chunks(encoder):
    context, mask = encoder(["a red car", words(200), ""])
    assert context.shape == (3, 3 * L, WIDTH) and mask.shape == (3, 3 * L)
    empty = encoder.empty_chunk()
    for b in (0, 2):
        for c in (1, 2):  # missing chunks: the empty chunk's encoding, fully masked
            torch.testing.assert_close(context[b, c * L:(c + 1) * L], empty)
            assert not mask[b, c * L:(c + 1) * L].any()
    assert mask[1].sum() == 200 + 3 * 2  # tokens + BOS/EOS per chunk
    # Padding does not change the real chunks: same as encoding the prompt alone.
    alone, alone_mask = encoder(["a red car"])
    torch.testing.assert_close(context[0, :L], alone[0])
    assert torch.equal(mask[0, :L], alone_mask[0])


def test_empty_prompt(encoder):
    context, mask = encoder.encode_empty(batch_size=2)
    assert context.shape == (2, L, WIDTH) and mask.shape == (2, L)
    assert mask[:, :2].all() and not mask[:, 2:].any()  # BOS and EOS only
    assert context.abs().sum() > 0  # the encoding of "", not zeros
    torch.testing.assert_close(context[0], encoder.empty_chunk())
    assert encoder.token_strings("")[:3] == ["<start_of_text>", "<end_of_text>", "<pad>"]


def test_token_strings(encoder):
    labels = encoder.token_strings("a photo of a cat")
    assert labels[:7] == ["<start_of_text>", "a", "photo", "of", "a", "cat", "<end_of_text>"]
    assert labels[7:] == ["<pad>"] * (L - 7)


def test_truncation_warns_and_reports_cut_text(encoder, caplog):
    prompt = words(225) + " zebra giraffe"
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        tokens, _, dropped = encoder.tokenize_chunks([prompt, "short"])
    assert tokens.shape == (2, 3, L)
    assert dropped == ["zebra giraffe", ""]
    assert "zebra giraffe" in caplog.text and "truncated" in caplog.text
    context, _ = encoder([prompt])
    assert context.shape == (1, 3 * L, WIDTH)


def test_frozen(encoder):
    assert encoder.frozen is True
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.Sequential(encoder, torch.nn.Dropout())
    parent.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    assert parent[1].training
    context, _ = encoder(["a cat"])
    assert not context.requires_grad


def test_vision_tower_dropped(encoder, clip_model):
    n_text = sum(p.numel() for p in encoder.parameters())
    assert n_text < sum(p.numel() for p in clip_model.parameters()) / 2
    assert not any(k.startswith("visual") for k in encoder.state_dict())


def test_pretrained_file_matches_in_memory_model(weights_path, clip_model):
    # Loaded from the saved state dict, the "last" output equals open_clip's own text path on the in-memory model.
    last = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, layer="last")
    prompts = ["a photo of a cat", "a dog"]
    tokens, _, _ = last.tokenize_chunks(prompts)
    tokens = tokens[:, 0]  # (B, 77), one chunk each
    with torch.no_grad():
        x = clip_model.token_embedding(tokens) + clip_model.positional_embedding
        x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
        expected = clip_model.ln_final(x)  # (B, 77, d): encode_text's token features before pooling/projection
        pooled = clip_model.encode_text(tokens)
    context, _ = last(prompts)
    torch.testing.assert_close(context, expected)
    # Tie to encode_text itself: pooling at the (first) EOS and projecting gives its features.
    eos = tokens.argmax(dim=-1)
    torch.testing.assert_close(context[torch.arange(2), eos] @ clip_model.text_projection, pooled)


def test_loaded_weights_equal_source(encoder, clip_model):
    for key, value in encoder.text.state_dict().items():
        assert torch.equal(value, clip_model.state_dict()[key]), key


def test_text_only_and_wrapped_checkpoints(encoder, tmp_path):
    # Text-only state dicts (this encoder's own) and {"state_dict": {"module.…"}} wrappers load too.
    own = tmp_path / "text_only.pt"
    torch.save(encoder.state_dict(), own)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in encoder.state_dict().items()}}, wrapped)
    reference, _ = encoder(["a cat"])
    for path in (own, wrapped):
        other = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=str(path))
        torch.testing.assert_close(other(["a cat"])[0], reference, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=str(tmp_path / "missing.pt"))


def test_random_weights_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=None)
    assert "RANDOM weights" in caplog.text


def test_tower_state_in_memory(encoder, caplog):
    """Weights already in memory (converted ones) load key for key, with no random-weights warning."""
    state = encoder.text.state_dict()
    with caplog.at_level(logging.WARNING):
        other = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=state)
    assert "RANDOM" not in caplog.text
    torch.testing.assert_close(other(["a cat"])[0], encoder(["a cat"])[0], rtol=0, atol=0)
    missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
    with pytest.raises(ValueError, match=r"1 missing keys \['ln_final.bias'\]"):
        FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=missing)
    extra = {**state, "text_projection": torch.zeros(WIDTH, WIDTH)}
    with pytest.raises(ValueError, match="1 unexpected keys.*text_projection"):
        FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=extra)
    misshapen = {**state, "ln_final.weight": torch.ones(WIDTH + 1)}
    with pytest.raises(ValueError, match=rf"misshapen.*ln_final.weight: expected \({WIDTH},\), got \({WIDTH + 1},\)"):
        FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=misshapen)


def test_layers_differ_and_final_norm(encoder, weights_path):
    last = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, layer="last")
    raw = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, final_norm=False)
    assert encoder.layer == "penultimate" and encoder.num_blocks == encoder.text.num_blocks - 1
    prompt = ["a photo of a cat"]
    penultimate, last_ctx, raw_ctx = encoder(prompt)[0], last(prompt)[0], raw(prompt)[0]
    assert not torch.allclose(penultimate, last_ctx)
    torch.testing.assert_close(encoder.text.ln_final(raw_ctx), penultimate)  # SD2: ln_final on penultimate


def test_zero_padding_matches_open_clip_tokenizer(weights_path, encoder):
    zero = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, pad_token="zero")
    prompt = "a photo of a cat"
    tokens, mask, _ = zero.tokenize_chunks([prompt])
    assert torch.equal(tokens[0], zero.tokenizer([prompt]))  # SD2 / open_clip layout
    # Causal attention: positions up to the EOS do not see the padding, so both pads agree there.
    eos_ctx, zero_ctx = encoder([prompt])[0], zero([prompt])[0]
    keep = mask[0, 0]
    torch.testing.assert_close(eos_ctx[0, keep], zero_ctx[0, keep])


def test_use_mask_false(weights_path):
    enc = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, use_mask=False)
    _, mask = enc(["a cat", words(80)])
    assert mask.shape == (2, 2 * L) and mask.all()


def test_pad_to_chunks(encoder):
    negative, neg_mask = encoder(["blurry"])
    padded, padded_mask = encoder.pad_to_chunks(negative, neg_mask, 3)
    assert padded.shape == (1, 3 * L, WIDTH) and padded_mask.shape == (1, 3 * L)
    torch.testing.assert_close(padded[:, :L], negative)
    torch.testing.assert_close(padded[0, L:2 * L], encoder.empty_chunk())
    assert not padded_mask[:, L:].any()
    # Same as padding inside a batch.
    batched, batched_mask = encoder(["blurry", words(200)])
    torch.testing.assert_close(padded[0], batched[0])
    assert torch.equal(padded_mask[0], batched_mask[0])
    with pytest.raises(ValueError):
        encoder.pad_to_chunks(padded, padded_mask, 2)


def test_a_cached_encoding_does_not_depend_on_its_batch(weights_path):
    # A resumed run starts with an empty cache: what it encodes must equal what the interrupted run had cached,
    # whichever captions first shared a batch with it.
    batched = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, cache_size=8)
    alone = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, cache_size=8)
    prompts = ["a cat", words(100), "a dog", "a photo of a cat on a red sofa"]
    context, mask = batched(prompts)
    for i, prompt in enumerate(prompts):
        single, single_mask = alone([prompt])
        n = single.shape[1]
        assert torch.equal(context[i, :n], single[0]) and torch.equal(mask[i, :n], single_mask[0]), prompt


def test_truncation_warning_is_one_short_line(encoder, caplog):
    prompt = words(3000)  # some 20,000 characters
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text"):
        encoder.tokenize_chunks([prompt])
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert lines and all(len(line) < 400 and "\n" not in line for line in lines), [len(x) for x in lines]


def test_cache_is_exact_and_bounded(weights_path, encoder):
    cached = FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, cache_size=2)
    prompts = ["a cat", words(100), "a dog"]
    first = cached(prompts)
    assert len(cached._cache) == 2  # LRU bound
    second = cached(prompts)
    reference = encoder(prompts)
    for a, b, c in zip(first, second, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c)
    cached.to(torch.float64)  # device/dtype changes invalidate the cache
    assert len(cached._cache) == 0
    assert cached(["a cat"])[0].dtype == torch.float64


def test_custom_text_clip_layout():
    # CustomTextCLIP keeps the text tower in `model.text`; ViTamin-S is the fastest such model to build.
    torch.manual_seed(0)
    model = open_clip.create_model("ViTamin-S", pretrained=None).eval()
    enc = FrozenOpenCLIPTextEncoder(arch="ViTamin-S", pretrained=None, layer="last")
    enc.text.load_state_dict({k[len("text."):]: v for k, v in model.state_dict().items()
                              if k.startswith("text.") and k[len("text."):] in enc.text.state_dict()})
    tokens, _, _ = enc.tokenize_chunks(["a photo of a cat"])
    tokens = tokens[:, 0]
    context, _ = enc(["a photo of a cat"])
    with torch.no_grad():
        pooled = model.encode_text(tokens)
    eos = tokens.argmax(dim=-1)
    torch.testing.assert_close(context[torch.arange(1), eos] @ model.text.text_projection, pooled)


def test_class_label_encoder():
    enc = ClassLabelEncoder(num_classes=10, dim=32)
    assert enc.frozen is False and enc.output_dim == 32
    assert all(p.requires_grad for p in enc.parameters())
    context, mask = enc([3, "7", 0])
    assert context.shape == (3, 1, 32) and mask.shape == (3, 1) and mask.all()
    torch.testing.assert_close(context[1, 0], enc.embedding.weight[7])
    torch.testing.assert_close(enc(torch.tensor([3, 7, 0]))[0], context)
    null, null_mask = enc.encode_empty(batch_size=2)
    assert null.shape == (2, 1, 32) and null_mask.all()
    torch.testing.assert_close(null[0, 0], enc.embedding.weight[10])
    torch.testing.assert_close(enc([""])[0][0], null[0])  # caption dropout "" → null class
    with pytest.raises(ValueError):
        enc([11])
    context.sum().backward()
    assert enc.embedding.weight.grad is not None


def test_conditioner_protocol(encoder):
    assert isinstance(encoder, Conditioner)
    assert isinstance(ClassLabelEncoder(num_classes=2, dim=4), Conditioner)


def test_every_conditioner_implements_the_whole_protocol(encoder, weights_path):
    """What production code reads from a conditioner, read directly and checked against what it does."""
    cases = [
        (encoder, ["a cat", words(80)]),
        (FrozenOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path, use_mask=False), ["a cat", words(80)]),
        (TrainableOpenCLIPTextEncoder(arch=ARCH, pretrained=weights_path), ["a cat", words(80)]),
        (ClassLabelEncoder(num_classes=3, dim=8), [0, 2]),
    ]
    for conditioner, inputs in cases:
        name = type(conditioner).__name__
        context, mask = conditioner(inputs)
        assert context.shape[-1] == conditioner.output_dim, name
        assert context.shape[1] % conditioner.tokens_per_chunk == 0, name
        chunks = context.shape[1] // conditioner.tokens_per_chunk
        # frozen: no weight of it trains (and so it needs no optimizer entry); a trainable one trains all.
        trains = [p.requires_grad for p in conditioner.parameters()]
        assert (not any(trains)) if conditioner.frozen else all(trains), name

        empty, empty_mask = conditioner.encode_empty(batch_size=2)
        assert empty.shape == (2, conditioner.tokens_per_chunk, conditioner.output_dim), name
        torch.testing.assert_close(empty[:1], conditioner([""])[0])  # what caption dropout's "" gives

        padded, padded_mask = conditioner.pad_to_chunks(empty, empty_mask, chunks)
        assert padded.shape == (2, chunks * conditioner.tokens_per_chunk, conditioner.output_dim), name
        # use_mask answers "are padding chunks attended?": not with the mask on, all of them with it off.
        added = padded_mask[:, conditioner.tokens_per_chunk:]
        assert (not added.any()) if conditioner.use_mask else added.all(), name
        if not conditioner.use_mask:
            assert mask.all(), name

        conditioner.clear_cache()
        torch.testing.assert_close(conditioner(inputs)[0], context)
        assert isinstance(conditioner, Conditioner), name
