"""Random tiny transformers Qwen2 checkpoints written to disk, the independent reference for the model tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def random_qwen2(seed: int, *, heads: int, kv_heads: int, tied: bool, rope_theta: float = 10000.0, layers: int = 3):
    """A transformers Qwen2ForCausalLM (float32, eager attention) with every weight drawn at random."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=8 * heads,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_theta=rope_theta,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_reference(model, tokens: np.ndarray):
    """(logits, hidden_states[-2]) of the transformers model on int tokens [batch, seq]."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens)).long(), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-2].numpy()


def torch_score_module(hidden: int, seed: int = 0) -> torch.nn.Sequential:
    """The released head layout: Sequential(Linear(C, 2C), ReLU, Dropout(0.5), Linear(2C, 1))."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, 2 * hidden), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * hidden, 1)
    )
    return head.eval()
