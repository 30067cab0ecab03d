"""The turn end comes from the chat template, not from eos_token: ChatML, Llama-3 and Gemma styles,
built locally on SmolLM2's tokenizer (no hub)."""
from __future__ import annotations

import pytest

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def styled_tokenizer(base_dir, style: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if style == "llama3":
        tok.add_special_tokens({"eos_token": "<|end_of_text|>",
                                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3
    elif style == "gemma":
        tok.add_special_tokens({"eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = GEMMA
    return tok


@pytest.mark.parametrize("style, turn_end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>")])
def test_turn_end_is_read_from_the_template(smol_tokenizer_dir, style, turn_end):
    from qlora_ops.tasks.model.prompting import encode, format_prompt, stop_ids, turn_end_id

    tok = styled_tokenizer(smol_tokenizer_dir, style)
    end = tok.convert_tokens_to_ids(turn_end)
    assert turn_end_id(tok) == end
    if style != "chatml":
        assert tok.eos_token_id != end  # the trap: eos is not the turn end here
    ids, labels = encode(tok, {"system": "Answer with the label.", "prompt": "Item 1?", "completion": "json"}, 96)
    assert ids[-1] == end and labels[-1] == end
    assert [x for x in labels if x != -100] == tok("json", add_special_tokens=False).input_ids + [end]
    assert "Answer with the label." in format_prompt(tok, "Answer with the label.", "Item 1?")  # Gemma: folded in
    assert end in stop_ids(tok) and tok.eos_token_id in stop_ids(tok)
