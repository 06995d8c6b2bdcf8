"""minilm reproduces Hugging Face's GPT-2 implementation, given the same weights.

The Hugging Face model is built locally from a GPT2Config with random weights: nothing
is downloaded.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by the test command

from minilm.hf import config_from_hf, gpt2_from_hf  # noqa: E402

SHAPES = [
    dict(vocab_size=101, n_positions=64, n_embd=48, n_layer=3, n_head=4, activation_function="gelu_new"),
    dict(vocab_size=257, n_positions=128, n_embd=96, n_layer=2, n_head=6, activation_function="gelu", n_inner=200),
    dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=4, n_head=2, tie_word_embeddings=False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["gelu_new", "gelu-custom-dff", "untied"])
@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_logits_match_hf(shape, attention):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        **shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    if not hf_config.tie_word_embeddings:  # make sure the head really differs from the embedding
        torch.nn.init.normal_(hf.lm_head.weight, std=0.02)
    ours = gpt2_from_hf(hf, attention=attention).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"] // 2))
    with torch.no_grad():
        expected = hf(idx).logits
        actual, _ = ours(idx)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    # and the loss, computed the same way (next-token cross-entropy)
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss
        _, our_loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(our_loss, hf_loss, rtol=0, atol=1e-5)


def test_unsupported_variant_is_rejected():
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        config_from_hf(transformers.GPT2Config(activation_function="relu"))
