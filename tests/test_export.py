"""minilm -> Hugging Face export: transformers loads the folder offline and computes what minilm computes.

Models have random weights (seeded) and tokenizers built from the bundled corpus: the test is
that the two libraries agree on the same numbers, which needs no training.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # a dev dependency: installed by the test command
safetensors_torch = pytest.importorskip("safetensors.torch")

from minilm.checkpoint import save_checkpoint  # noqa: E402
from minilm.cli import main  # noqa: E402
from minilm.config import Config  # noqa: E402
from minilm.data import load_text  # noqa: E402
from minilm.export import ExportError, export_model, hf_tokenizer  # noqa: E402
from minilm.generation import generate_text  # noqa: E402
from minilm.hf import config_from_hf, state_dict_from_hf, state_dict_to_hf  # noqa: E402
from minilm.model import GPT  # noqa: E402
from minilm.tokenizer import BPETokenizer, CharTokenizer  # noqa: E402

PROMPT = "ROMEO:\nWhat light"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_text("shakespeare")[:100_000]


def _model(cfg: Config) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        # Wide logits (embedding std 1, not 0.02): greedy decoding then never hinges on two
        # logits a rounding error apart, so equal text is a fair test.
        model.wte.weight.normal_(0.0, 1.0)
        if not cfg.tie_embeddings:
            model.lm_head.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():  # non-zero biases and norms, so a mix-up shows
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def _load_hf(out):
    # local_files_only: proves nothing is fetched (the folder is complete).
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    return hf, tok


CASES = {
    # char tokenizer (about 60 characters) inside a padded 128-row vocabulary, tied, exact GELU
    "char-padded-tied-gelu": dict(tokenizer="char", vocab_size=128, bias=True, tie_embeddings=True, activation="gelu"),
    # BPE, untied head, no biases, tanh GELU, custom MLP width
    "bpe-untied-nobias-tanh": dict(
        tokenizer="bpe", vocab_size=320, bias=False, tie_embeddings=False, activation="gelu_tanh", d_ff=100
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_export_round_trip_logits_and_greedy_text(case, corpus, tmp_path):
    fields = CASES[case]
    cfg = Config(d_model=48, n_heads=4, n_layers=2, max_seq_len=64, **fields)
    tok = CharTokenizer.from_text(corpus) if cfg.tokenizer == "char" else BPETokenizer.train(corpus, cfg.vocab_size)
    model = _model(cfg)
    out = export_model(model, tok, cfg, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    hf, hf_tok = _load_hf(out)
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    assert hf.config.vocab_size == tok.vocab_size  # padding rows dropped
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings

    # The tokenizers agree on ids and text.
    ids = tok.encode(PROMPT)
    assert hf_tok(PROMPT)["input_ids"] == ids
    assert hf_tok.decode(tok.encode(corpus[:2000])) == corpus[:2000]

    # Logits: every real token's logit equal to 1e-5.
    idx = torch.tensor([tok.encode(corpus[:1000])[:64], tok.encode(corpus[5000:6000])[:64]])  # (2, max_seq_len)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours[..., : tok.vocab_size], rtol=0, atol=1e-5)

    # Greedy text: minilm's sampler (which masks padding ids) and transformers' generate.
    (expected,) = generate_text(model, tok, PROMPT, NEW_TOKENS, temperature=0)
    prompt_ids = torch.tensor([ids])
    with torch.no_grad():
        generated = hf.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert generated.shape[1] == len(ids) + NEW_TOKENS
    assert hf_tok.decode(generated[0]) == expected


def test_weights_map_back_to_minilm():
    """to_hf then from_hf is the identity (bias-free configs come back with the zero biases dropped)."""
    for bias, tie in [(True, True), (False, False)]:
        cfg = Config(vocab_size=70, d_model=32, n_heads=2, n_layers=2, max_seq_len=16, bias=bias, tie_embeddings=tie)
        model = _model(cfg)
        back = state_dict_from_hf(state_dict_to_hf(model.state_dict(), cfg), cfg.replace(bias=True))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(back[key], value, rtol=0, atol=0)
        dropped = set(back) - set(model.state_dict())
        assert all(key.endswith(".bias") for key in dropped) and (bool(dropped) == (not bias))
        assert all(not back[k].any() for k in dropped)


def test_exported_config_maps_back_to_the_same_architecture(corpus, tmp_path):
    cfg = Config(vocab_size=128, d_model=32, n_heads=4, n_layers=3, max_seq_len=32, activation="gelu_tanh", d_ff=72)
    out = export_model(_model(cfg), CharTokenizer.from_text(corpus), cfg, tmp_path / "hf")
    back = config_from_hf(transformers.GPT2Config.from_pretrained(out))
    for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "activation", "d_ff", "tie_embeddings"):
        assert getattr(back, name) == getattr(cfg, name), name


def test_tokenizer_larger_than_model_is_refused_naming_the_field(corpus, tmp_path):
    tok = CharTokenizer.from_text(corpus)
    cfg = Config(vocab_size=tok.vocab_size - 1, d_model=16, n_heads=2, n_layers=1, max_seq_len=16)
    with pytest.raises(ExportError, match="field 'vocab_size'"):
        export_model(GPT(cfg), tok, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_char_tokenizer_keeps_spaces_and_newlines(corpus):
    tok = CharTokenizer.from_text(corpus)
    hf = hf_tokenizer(tok)
    text = "  a\n\nb  c \n"
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_cli_exports_the_newest_checkpoint(corpus, tmp_path, capsys):
    cfg = Config(vocab_size=96, d_model=32, n_heads=2, n_layers=1, max_seq_len=32, tokenizer="char")
    tok = CharTokenizer.from_text(corpus)
    model = _model(cfg)
    run = tmp_path / "run"
    for step in (1, 2):  # the export must take checkpoint-2
        with torch.no_grad():
            model.wpe.weight.add_(step)
        save_checkpoint(run, step, model_state=model.state_dict(), training_state={}, config=cfg, tokenizer=tok)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    weights = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")  # plain tensors, no pickle
    torch.testing.assert_close(weights["transformer.wpe.weight"], model.wpe.weight.detach(), rtol=0, atol=0)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
