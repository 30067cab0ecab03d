"""MLflow pyfunc "model from code" for a merged causal LM (no pickle).

This file is copied into the logged MLflow model and executed when the model is loaded, so it
must stay self-contained: only mlflow, torch, transformers, pandas (optional) and the stdlib.
Nothing from `tasks` may be imported here.

Artifacts (set by tasks.register.log_merged_model):
  model    a Hugging Face model dir (config.json, *.safetensors, tokenizer files)
  serving  a JSON file {"system_prompt": str, "max_new_tokens": int}

Input: a list of str, a single str, or a pandas DataFrame with a "prompt" column.
Output: a list of completions (str), one per prompt, greedy-decoded.
"""
from __future__ import annotations

import json

import mlflow
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class MergedCausalLM(mlflow.pyfunc.PythonModel):
    batch_size = 16

    def load_context(self, context):
        model_dir = context.artifacts["model"]
        with open(context.artifacts["serving"]) as f:
            cfg = json.load(f)
        self.system_prompt = str(cfg.get("system_prompt", ""))
        self.max_new_tokens = int(cfg.get("max_new_tokens", 32))
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer in {model_dir} has no eos_token; generation could not stop")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # decoder-only batched generation: pad on the left
        self.tokenizer = tok
        # The dtype it was registered (and evaluated) in; a bf16 model on CPU is slow but answers the same.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=False, dtype="auto")
        self.model.eval()

    def _format(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"{self.system_prompt}\n\n{prompt}\n\nAnswer: "

    @staticmethod
    def _prompts(model_input) -> list[str]:
        if isinstance(model_input, str):
            return [model_input]
        columns = getattr(model_input, "columns", None)
        if columns is not None:  # pandas DataFrame
            if "prompt" not in columns:
                raise ValueError(f"DataFrame input needs a 'prompt' column; got columns {list(columns)}")
            return [str(p) for p in model_input["prompt"].tolist()]
        if isinstance(model_input, dict) and "prompt" in model_input:
            p = model_input["prompt"]
            return [p] if isinstance(p, str) else [str(x) for x in p]
        if hasattr(model_input, "tolist"):  # numpy array / pandas Series
            model_input = model_input.tolist()
        if isinstance(model_input, (list, tuple)) and all(isinstance(p, str) for p in model_input):
            return list(model_input)
        raise TypeError("model_input must be a str, a list of str, or a DataFrame with a 'prompt' column; "
                        f"got {type(model_input).__name__}")

    @torch.inference_mode()
    def predict(self, context, model_input, params=None):
        prompts = self._prompts(model_input)
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        tok, model = self.tokenizer, self.model
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self._format(p) for p in prompts[i:i + self.batch_size]]
            # The chat template already renders any BOS it wants; don't add a second one.
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            # Stop on the chat template's turn end, which the merge wrote into generation_config
            # (<|eot_id|>, <end_of_turn>, ... are not always eos_token).
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=model.generation_config.eos_token_id or tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
        return out


mlflow.models.set_model(MergedCausalLM())
