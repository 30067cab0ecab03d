"""Prompt formatting shared by training, evaluation and serving (tasks/registry/loader.py imports it).

The tokenizer's chat template renders system + user turns and the assistant header; the training
target is the completion followed by the template's own turn-end token, so a tuned model learns to
stop where the template says a turn ends. That token is not always `eos_token`: ChatML ends a turn with
<|im_end|>, Llama-3 with <|eot_id|> (its eos is <|end_of_text|>), Gemma with <end_of_turn>. We read it
from the template itself by rendering an assistant turn and taking the first special token after it.
"""
from __future__ import annotations

_PROBE = "qlora-ops-probe-answer"


def _messages(system: str, prompt: str, merge_system: bool) -> list[dict]:
    if merge_system:  # templates without a system role (Gemma) raise on one: fold it into the user turn
        return [{"role": "user", "content": f"{system}\n\n{prompt}" if system else prompt}]
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def _render(tok, msgs_for, **kw) -> str:
    try:
        return tok.apply_chat_template(msgs_for(False), tokenize=False, **kw)
    except Exception as e:  # jinja TemplateError("System role not supported") and the like
        if "system" not in str(e).lower():
            raise
        return tok.apply_chat_template(msgs_for(True), tokenize=False, **kw)


def format_prompt(tok, system: str, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return _render(tok, lambda merge: _messages(system, prompt, merge), add_generation_prompt=True)
    return f"{system}\n\n{prompt}\n\nAnswer: "


def turn_end_id(tok) -> int:
    """The token that ends an assistant turn in this tokenizer's chat template (eos without a template)."""
    if getattr(tok, "chat_template", None):
        text = _render(tok, lambda merge: _messages("s", "u", merge) + [{"role": "assistant", "content": _PROBE}])
        if _PROBE in text:
            tail = text[text.rindex(_PROBE) + len(_PROBE):]
            special = set(tok.all_special_ids)
            for i in tok(tail, add_special_tokens=False).input_ids:
                if i in special:
                    return i
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token and its chat template marks no turn end; set one so "
                         "training targets can end and generation can stop")
    return tok.eos_token_id


def eos_id(tok) -> int:
    """What a completion ends with and generation stops on: the template's turn end."""
    return turn_end_id(tok)


def stop_ids(tok) -> list[int]:
    """Generation stops on the turn end, and on eos too (a model may emit either)."""
    return sorted({turn_end_id(tok), *([tok.eos_token_id] if tok.eos_token_id is not None else [])})


def bake_system_prompt(tok, system: str) -> bool:
    """Make the template itself supply `system` when a conversation has none, so a plain transformers
    or vLLM load of the registered model prompts exactly as training did. Kept only if rendering a bare
    user turn then equals our own prompt; otherwise (templates without a system role) left unchanged."""
    import json

    original = tok.chat_template
    if not original or not system:
        return False
    want = format_prompt(tok, system, _PROBE)
    tok.chat_template = ("{%- if messages and messages[0]['role'] != 'system' -%}{%- set messages = "
                         "[{'role': 'system', 'content': " + json.dumps(system) + "}] + messages -%}{%- endif -%}"
                         + original)
    try:
        ok = tok.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                     add_generation_prompt=True) == want
    except Exception:
        ok = False
    if not ok:
        tok.chat_template = original
    return ok


def encode(tok, row: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens masked with -100 so loss is on the completion + turn end only."""
    p = tok(format_prompt(tok, row["system"], row["prompt"]), add_special_tokens=False).input_ids
    c = tok(row["completion"], add_special_tokens=False).input_ids + [eos_id(tok)]
    if len(c) >= max_len:
        raise ValueError(f"completion of row {row.get('id')} is {len(c)} tokens, >= model.max_seq_len={max_len}")
    p = p[-(max_len - len(c)):]  # keep the end of an over-long prompt: it holds the question and the turn header
    return p + c, [-100] * len(p) + c
