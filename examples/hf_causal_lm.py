"""A Hugging Face `transformers` causal LM through paci: GPT-2 or Llama built from a config
(nothing is downloaded), split into its decoder layers, trained with PACI on the embedded corpus.

The units are the embeddings, each decoder layer, and the final norm + LM head; run one after the
other they give the model's own logits (checked below before training). GPT-2's layers pass one
tensor, the hidden states (causal masking is built into their attention). Llama's layers also
need the rotary position embeddings, computed once from the positions: its units pass a tuple
(hidden states, cos, sin) from stage to stage, as the model passes them from layer to layer.
Needs `pip install transformers` (the `hf` extra).

    .venv/bin/python examples/hf_causal_lm.py [--family llama] [--steps 30]
    .venv/bin/torchrun --nproc-per-node 3 examples/hf_causal_lm.py --family llama   # one stage per process
"""

import argparse
import os
import sys

import torch
from torch import nn

import paci
from paci.data import load_data
from paci.model import lm_loss

try:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
except ImportError:
    sys.exit("examples/hf_causal_lm.py needs transformers: .venv/bin/pip install 'transformers==5.24.0' "
             "(or pip install -e '.[hf]')")


class Embeddings(nn.Module):
    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


class Block(nn.Module):
    """A GPT2Block that returns only its hidden states."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


class Head(nn.Module):
    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.ln_f, self.lm_head = model.transformer.ln_f, model.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def gpt2_units(vocab_size: int = 4096, layers: int = 4, width: int = 128, context: int = 64):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()  # dropout is off anyway; eval() keeps it so
    return model, [Embeddings(model), *[Block(b) for b in model.transformer.h], Head(model)]


class LlamaEmbeddings(nn.Module):
    """Token embeddings, and the rotary (cos, sin) of the positions, which every layer reads."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.embed, self.rotary = model.model.embed_tokens, model.model.rotary_emb

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, position_ids=torch.arange(ids.shape[1], device=ids.device)[None])
        return hidden, cos, sin


class LlamaLayer(nn.Module):
    """A LlamaDecoderLayer on (hidden, cos, sin): causal attention (no mask: SDPA's own)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        hidden, cos, sin = parts
        out = self.layer(hidden, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out, cos, sin


class LlamaHead(nn.Module):
    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.norm, self.lm_head = model.model.norm, model.lm_head

    def forward(self, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.lm_head(self.norm(parts[0]))


def llama_units(vocab_size: int = 4096, layers: int = 4, width: int = 128, context: int = 64):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, tie_word_embeddings=False, attn_implementation="sdpa",
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    return model, [LlamaEmbeddings(model), *[LlamaLayer(layer) for layer in model.model.layers], LlamaHead(model)]


FAMILIES = {"gpt2": gpt2_units, "llama": llama_units}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="gpt2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stages", type=int, default=int(os.environ.get("WORLD_SIZE", 3)))
    args = parser.parse_args()
    model, units = FAMILIES[args.family]()
    data = load_data(None, 4096)
    ids, _ = data.batch(0, 0, 2, 32)
    with torch.no_grad():
        by_units = nn.Sequential(*units)(ids)
        torch.testing.assert_close(by_units, model(ids).logits)  # the split is the model
    pipe = paci.Pipeline(units, lm_loss, lambda params: torch.optim.AdamW(params, lr=1e-3), schedule="paci",
                         stages=args.stages, microbatches=8)
    batches = (data.batch(0, k, 16, 32) for k in range(args.steps))  # 16 sequences of 32 tokens per step
    losses = pipe.fit(batches, steps=args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{type(model).__name__} ({len(units) - 2} decoder layers) as {len(units)} units on {args.stages} stages "
              f"{[len(m) for m in pipe.stage_modules]}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
              f"over {len(losses)} steps")


if __name__ == "__main__":
    main()
