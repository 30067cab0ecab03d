"""Weight bytes of Llama-architecture models at 135M, 1B, 7B and 70B shapes, 4-bit (NF4 + double
quantization) vs bf16, and an estimate of the QLoRA training peak at the default batch.

    python bench/footprint.py            # all four shapes; nothing is allocated (meta device)

The models are built from their configs on the meta device (accelerate.init_empty_weights), so the
parameter counts are the real modules', at no memory cost. The 4-bit bytes follow bitsandbytes' NF4
layout with double quantization: 4 bits per weight, an fp8 absmax per 64-weight block, an fp32
scale per 256 absmax blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits per quantized parameter. What is
not quantized (embeddings, norms, the LM head: every Linear of the decoder layers is) stays bf16.

The training estimate (GPU, bf16 compute): 4-bit base + LoRA r=16 on every linear (fp32 weights,
grads and two AdamW moments: 16 bytes per trainable parameter) + gradient-checkpointed activations
(one bf16 hidden state per layer boundary, plus one layer's full activations recomputed in
backward) + fp32 logits only at the completion positions (tasks.train.batches keeps the last K).
"""
from __future__ import annotations

import argparse

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # = 4.127

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "135M (SmolLM2-135M)": (576, 1536, 30, 9, 3, 49152, True),
    "1B (TinyLlama-1.1B)": (2048, 5632, 22, 32, 4, 32000, False),
    "7B (Llama-2-7B)": (4096, 11008, 32, 32, 32, 32000, False),
    "70B (Llama-2-70B)": (8192, 28672, 80, 64, 8, 32000, False),
}


def count(shape: tuple) -> dict:
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, L, nh, kv, vocab, tied = shape
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=nh,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    if tied:
        model.tie_weights()  # the LM head is the embedding: counted once
    quant, lora_params = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            quant += m.weight.numel()
            lora_params += 16 * (m.in_features + m.out_features)  # r = 16
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert all(p.device.type == "meta" for p in model.parameters())
    return {"total": total, "quantized": quant, "other": total - quant, "lora": lora_params, "cfg": cfg}


def training_peak(c: dict, batch: int, seq: int, keep: int) -> float:
    cfg = c["cfg"]
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    weights = c["quantized"] * NF4_BITS / 8 + c["other"] * 2
    lora = c["lora"] * 16
    tokens = batch * seq
    boundaries = L * tokens * h * 2
    one_layer = tokens * (12 * h + 7 * i) * 2  # norms, q/k/v/o, attention, gate/up/act/down, LoRA inputs
    logits = batch * keep * cfg.vocab_size * 4
    return weights + lora + boundaries + one_layer + logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="tokens per row (the default model.max_seq_len)")
    ap.add_argument("--keep", type=int, default=8, help="positions whose logits the loss needs")
    ap.add_argument("--only", help="one shape, e.g. 135M")
    a = ap.parse_args()
    gib = 2 ** 30
    print(f"NF4 + double quant: {NF4_BITS:.4f} bits per quantized parameter (4 + 8/64 + 32/(64*256))")
    print(f"{'model':<22}{'params':>9}{'quantized':>11}{'bf16 GiB':>10}{'4-bit GiB':>10}{'bits/param':>11}"
          f"{'x smaller':>10}{'train peak GiB':>15}")
    for name, shape in SHAPES.items():
        if a.only and not name.startswith(a.only):
            continue
        c = count(shape)
        bf16 = c["total"] * 2
        four = c["quantized"] * NF4_BITS / 8 + c["other"] * 2
        print(f"{name:<22}{c['total'] / 1e9:>8.3f}B{100 * c['quantized'] / c['total']:>10.1f}%{bf16 / gib:>10.3f}"
              f"{four / gib:>10.3f}{8 * four / c['total']:>11.3f}{bf16 / four:>10.2f}"
              f"{training_peak(c, a.batch, a.seq, a.keep) / gib:>15.2f}")
    print(f"train peak: batch {a.batch} x {a.seq} tokens, LoRA r=16 all-linear, gradient checkpointing, "
          f"logits at {a.keep} positions; an estimate, not a measurement")


if __name__ == "__main__":
    main()
