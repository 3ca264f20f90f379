"""A `paci plan --costs` file for a machine not at hand: paci's `gpt2-medium` on 8 NVIDIA A100-SXM4-80GB
GPUs in one NVLink node, derived from published figures and a FLOP and byte count of each unit.

Published figures (the file lists them as its sources):
* A100 SXM4 80 GB (NVIDIA A100 datasheet): 312 TFLOP/s dense BF16 tensor-core peak, 2,039 GB/s
  HBM2e, third-generation NVLink at 600 GB/s per GPU (both directions, 12 links).
* Achieved fraction of peak: Narayanan et al., SC21 (arXiv 2104.04473), 44-52% on A100s for GPTs
  of 1.7 B to 1 T parameters; a 350 M model's smaller matrices reach less, so 40% is assumed.
* Activation bytes per layer and token with 16-bit activations, no recomputation and no tensor
  parallelism: Korthikanti et al. 2022 (arXiv 2205.05198), h(34 + 5 a s / h): attention 11 h +
  5 a s, MLP 19 h, the two layer norms 4 h (here each with its own half of the block).

Counted here: forward FLOPs per token, 8 h^2 + 4 s h for an attention half (QKV, output projection,
scores and values without causal skipping), 16 h^2 for an MLP half, 2 h V for the head; backward
twice the forward, its input-gradient half of that; the embedding is a lookup (memory-bound, its
gather and scatter charged at HBM speed). AdamW's step is memory-bound: 28 bytes per parameter
(read fp32 weight, gradient and both moments; write weight and moments) at half the HBM bandwidth
(a per-parameter, unfused step). Static bytes: fp32 weights, gradients and two moments, 16 per
parameter; a stashed weight copy 4 per parameter; a message between stages the bf16 hidden state,
2 h bytes per token. The link: 200 GB/s and 10 us per message between two GPUs of the node
(assumed: NCCL point-to-point gets less than NVLink's 300 GB/s per direction).

    .venv/bin/python experiments/cost_file.py    # writes configs/costs/gpt2-medium-8xa100.json
"""

import json
from pathlib import Path

from paci.model import PRESETS, unit_names

OUT = Path(__file__).resolve().parents[1] / "configs" / "costs" / "gpt2-medium-8xa100.json"
PEAK_FLOPS, MFU = 312e12, 0.40
HBM, UPDATE_EFFICIENCY = 2.039e12, 0.5
B, S = 8, 1024  # the micro-batch the file describes: 8 sequences of 1024 tokens


def units() -> list[dict]:
    config = PRESETS["gpt2-medium"]
    h, a, V = config.n_embd, config.n_head, config.vocab_size
    tokens = B * S
    flops_per_s = PEAK_FLOPS * MFU
    out = []
    for name in unit_names(config):
        if name == "embed":
            params = V * h + config.block_size * h
            forward = tokens * h * 2 * 2 / HBM  # gather wte and wpe rows, write the sum (bf16)
            backward, input_backward = 2 * forward, 0.0  # scatter-add into the gradients
            activation = 0
        elif name.endswith(".attn"):
            params = 4 * h * h + 4 * h + 2 * h
            forward = tokens * (8 * h * h + 4 * S * h) / flops_per_s
            backward, input_backward = 2 * forward, forward
            activation = tokens * (11 * h + 5 * a * S + 2 * h)
        elif name.endswith(".mlp"):
            params = 8 * h * h + 5 * h + 2 * h
            forward = tokens * 16 * h * h / flops_per_s
            backward, input_backward = 2 * forward, forward
            activation = tokens * (19 * h + 2 * h)
        else:  # the head: final layer norm, lm_head, cross-entropy over fp32 logits
            params = V * h + 2 * h
            forward = tokens * 2 * h * V / flops_per_s
            backward, input_backward = 2 * forward, forward
            activation = tokens * (2 * h + 4 * V)
        out.append({"name": name, "forward_s": forward, "backward_s": backward, "input_backward_s": input_backward,
                    "update_s": 28 * params / (HBM * UPDATE_EFFICIENCY), "static_bytes": 16 * params,
                    "activation_bytes": activation, "param_bytes": 4 * params})
    return out


def main() -> None:
    document = {
        "description": "paci's gpt2-medium (24 layers, 1024 wide, 50304-token vocabulary, untied head) on 8 "
                       "NVIDIA A100-SXM4-80GB in one NVLink node, bf16 autocast, micro-batches of 8 x 1024 "
                       "tokens: derived, not measured (experiments/cost_file.py)",
        "sources": ["NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s BF16 dense, 2,039 GB/s HBM2e (80 GB SXM), "
                    "NVLink 600 GB/s",
                    "Narayanan et al., Efficient Large-Scale Language Model Training on GPU Clusters Using "
                    "Megatron-LM, SC21, arXiv 2104.04473: 44-52% of peak on A100",
                    "Korthikanti et al., Reducing Activation Recomputation in Large Transformer Models, "
                    "arXiv 2205.05198: activation bytes per layer sbh(34 + 5as/h)"],
        "assumptions": [f"{MFU:.0%} of peak for every matrix product", "attention without causal skipping",
                        "AdamW at half the HBM bandwidth, 28 bytes per parameter",
                        "200 GB/s and 10 us per point-to-point message", "times linear in the micro-batch size"],
        "preset": "gpt2-medium", "microbatch_size": B, "seq_len": S, "units": units(),
        "latency_s": 10e-6, "bandwidth_Bps": 200e9, "message_bytes_per_token": 2 * PRESETS["gpt2-medium"].n_embd,
        "memory_per_device": "80GiB",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
