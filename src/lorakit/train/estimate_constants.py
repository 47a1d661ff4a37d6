"""Constants of the memory estimate that come from measured training jobs, not from the model."""

EVAL_BATCH = 64  # prompts per evaluation forward (train/evaluate.py)
# Peak RSS of training steps on this kind of machine (Linux, glibc malloc, SmolLM2-135M, LoRA, bf16 autocast)
# exceeded runtime + weights + saved activations by 0.71-0.95x the saved activations: 0.71-0.94 repeating
# one batch of 8-32 rows x 40-64 tokens, 0.95 over the demo's 60 steps, whose batch lengths vary. glibc
# serves a step's many mid-sized tensors from its heap and keeps the freed, fragmented space resident.
HEAP_SLACK = 0.9
# What a training job holds beside the model that the estimating process does not: the tokenizer, the
# tokenized data and what from_pretrained leaves behind (104 MiB measured for the default model and data).
JOB_EXTRAS = 100 * 2**20
