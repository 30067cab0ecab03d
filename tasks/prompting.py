"""Prompt formatting shared by training, evaluation and serving-time checks.

The tokenizer's chat template renders system + user turns and the assistant header; the
training target is the completion followed by the EOS / end-of-turn token, so a tuned model
learns to stop (no runaway to max_new_tokens).
"""
from __future__ import annotations


def format_prompt(tok, system: str, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{prompt}\n\nAnswer: "


def eos_id(tok) -> int:
    """End-of-turn token: what generation stops on. For chat models this is the template's turn end."""
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; set one so training targets can end and generation can stop")
    return tok.eos_token_id


def encode(tok, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens masked with -100 so loss is on the completion + EOS only."""
    p = tok(format_prompt(tok, row["system"], row["prompt"]), add_special_tokens=False).input_ids
    c = tok(row["completion"], add_special_tokens=False).input_ids + [eos_id(tok)]
    if len(c) >= max_len:
        raise ValueError(f"completion of row {row.get('id')} is {len(c)} tokens, >= model.max_seq_len={max_len}")
    p = p[-(max_len - len(c)):]  # keep the end of an over-long prompt: it holds the question and the turn header
    return p + c, [-100] * len(p) + c
