"""Padded batches: left- and right-padded prompts of three lengths vs Hugging Face with the same
attention mask (and the position ids its ``generate`` derives from it), at the logits and at every
hidden state, for every family; and each row of a padded batch vs the same prompt run alone."""

import numpy as np
import pytest

from tests.hf_utils import max_err, save_random_hf, torch, transformers

import jaxinterp as ji

TOL = 1e-4
LENGTHS = (5, 9, 12)

CASES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=32)),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                 dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=61, max_position_embeddings=32, rotary_pct=0.5)),
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=48, vocab_size=61, max_position_embeddings=32)),
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, vocab_size=61, max_position_embeddings=32, sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=48, vocab_size=61, max_position_embeddings=32)),
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM,
              dict(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=61, conv_kernel=4)),
    "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM,
                     dict(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=61, conv_kernel=4)),
    "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM,
               dict(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=61, num_heads=8, head_dim=8,
                    n_groups=2, chunk_size=4)),
}
# State-space models take no position ids; Mamba-1's hidden_states have no embedding entry (see DESIGN.md).
NO_POSITIONS = ("mamba", "falcon_mamba", "mamba2")
NO_EMBED_ENTRY = ("mamba", "falcon_mamba")


def _batch(side: str, rng):
    width = max(LENGTHS)
    tokens = np.zeros((len(LENGTHS), width), np.int64)
    mask = np.zeros((len(LENGTHS), width), np.int64)
    rows = []
    for i, n in enumerate(LENGTHS):
        row = rng.integers(1, 61, n)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        tokens[i, sl], mask[i, sl] = row, 1
        rows.append(row)
    return tokens, mask, rows


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_matches_hf_and_unpadded_rows(tmp_path, case, side):
    cfg_cls, model_cls, fields = CASES[case]
    hf = save_random_hf(model_cls, cfg_cls(**fields, attn_implementation="eager"), tmp_path)
    model = ji.load(tmp_path)
    tokens, mask, rows = _batch(side, np.random.default_rng(7))
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    kw = {} if case in NO_POSITIONS else {"position_ids": torch.as_tensor(positions)}
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), output_hidden_states=True, **kw)
    out = model.run(tokens, attention_mask=mask, capture="blocks.*.resid_post")
    real = mask.astype(bool)
    assert max_err(np.asarray(out.logits)[real], ref.logits.numpy()[real]) < TOL
    n = model.config.n_layers
    for i in range(n - 1):  # transformers: hidden_states[i + 1] = blocks.i.resid_post; Mamba: hidden_states[i]
        hf_i = ref.hidden_states[i if case in NO_EMBED_ENTRY else i + 1].numpy()
        assert max_err(np.asarray(out.cache[f"blocks.{i}.resid_post"])[real], hf_i[real]) < TOL, i
    # Each row equals its prompt run alone (so padding changes nothing a user can see).
    for i, row in enumerate(rows):
        alone = np.asarray(model.run(row[None]).logits[0])
        assert max_err(np.asarray(out.logits[i])[real[i]], alone) < TOL, i
    # logits_at one position per row: each row's last real token.
    last = np.where(real, np.arange(tokens.shape[1]), -1).max(1)
    picked = model.run(tokens, attention_mask=mask, logits_at=last).logits  # [B, V]
    assert picked.shape == (len(LENGTHS), model.config.vocab_size)
    assert max_err(picked, np.asarray(out.logits)[np.arange(len(LENGTHS)), last]) < 1e-5


def test_padded_sites_are_those_hf_returns_for_attention(tmp_path):
    """Attention patterns of a left-padded batch: real queries give padding keys zero weight, and equal HF's."""
    cfg_cls, model_cls, fields = CASES["llama-gqa"]
    hf = save_random_hf(model_cls, cfg_cls(**fields, attn_implementation="eager"), tmp_path)
    model = ji.load(tmp_path)
    tokens, mask, _ = _batch("left", np.random.default_rng(3))
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions), output_attentions=True)
    pattern = np.asarray(model.run(tokens, attention_mask=mask, capture="blocks.1.attn.pattern").cache[
        "blocks.1.attn.pattern"])  # [B, H, T, T]
    real = mask.astype(bool)
    pad_keys_of_real_queries = real[:, None, :, None] & ~real[:, None, None, :]  # [B, 1, Tq, Tk]
    assert np.all(pattern[np.broadcast_to(pad_keys_of_real_queries, pattern.shape)] == 0)
    for b in range(len(LENGTHS)):
        assert max_err(pattern[b][:, real[b]], ref.attentions[1].numpy()[b][:, real[b]]) < TOL
