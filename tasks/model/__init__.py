"""Model: base model resolution, 4-bit/LoRA construction, prompting, merge, and the keys that name models, adapters and scores."""
