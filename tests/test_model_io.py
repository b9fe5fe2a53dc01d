"""A saved tiny model's tokenizer loads back as the same char tokenizer (spaces and newlines included)."""

from __future__ import annotations

from policyflow.model import build_tiny, load_pretrained, save_pretrained


def test_char_tokenizer_round_trips_through_save(tmp_path):
    model, tokenizer = build_tiny(seed=0, hidden_size=16, num_layers=1, intermediate_size=16, num_heads=2, num_kv_heads=1)
    folder = save_pretrained(model, tokenizer, tmp_path / "tiny")
    _, loaded = load_pretrained(folder)
    text = "Q: pop of Zorvak + Brelim?\n<info>Zorvak: capital Quelm, pop 48</info>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids and len(ids) == len(text)
    assert loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (tokenizer.pad_token_id, tokenizer.eos_token_id, "left")


def test_tiny_model_init_std_sets_the_initial_weight_scale():
    """`model.tiny.init_std` is the std of every weight matrix and embedding; biases start at 0."""
    for std in (0.02, 0.06):
        model, _ = build_tiny(seed=0, hidden_size=64, num_layers=2, intermediate_size=256, num_heads=4, num_kv_heads=2, init_std=std)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                assert abs(p.std().item() - std) < 0.1 * std, name
            elif name.endswith("bias"):
                assert not p.any(), name
