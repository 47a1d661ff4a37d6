"""Training data shared by `lorakit train` and the library trainer, in one import: read rows (records.py),
recognize their format (formats.py), tokenize them with loss masks (tokenization.py), batch them in a
resumable, shardable order (batching.py). This page documents the whole pipeline; each step is its module.

Formats, recognized by their fields:

    text               {"text"}                  causal LM, loss on every token
    prompt_completion  {"prompt", "completion"}  causal LM, loss on the completion (and its EOS) only
    messages           {"messages": [{"role", "content"}, ...]}
                                                 chat rendered by the tokenizer's chat template, loss on the
                                                 assistant turns only
    text_label         {"text", "label"}         sequence classification

Causal-LM sequences start with BOS when the tokenizer adds one by default and end with EOS (text, completion);
a chat template writes its own special tokens. A prompt and its completion are tokenized separately and
concatenated: the boundary is exact, and the prompt's tokens are the ones the model will see at inference,
when the prompt is tokenized alone.

Rows longer than max_length are truncated, counted (`TokenizedData.n_truncated`) and reported in one warning:

    text, messages     cut on the right (later chat turns go first).
    prompt_completion  the completion survives: the prompt loses tokens from its left (BOS stays). A completion
                       longer than max_length - 1 tokens is cut on the right, so that at least one prompt token
                       (or BOS) precedes it and its first token is still a prediction target.
    text_label         cut on the right, keeping the tokenizer's special tokens (e.g. [CLS] ... [SEP]).

Rows left with no token to learn from (a chat whose assistant turns were all cut off) are dropped and counted.

Batch order is a pure function of (n_examples, batch_size, seed, epoch), so a resumed run recomputes it and
skips the batches it has done. `shard` cuts each global batch into world_size contiguous parts, so world_size
processes with batch B / world_size each see exactly the global batches of one process with batch B.
"""

from __future__ import annotations

from .batching import IGNORE_INDEX, batch_order, collate, left_pad, pad_rows, shard
from .formats import FIELDS, FORMAT_TASKS, check_rows, detect_format, infer_task
from .records import Row, Rows, describe_row, load_records
from .tokenization import TRUNCATION, TokenizedData, label_vocabulary, tokenize

__all__ = ["FIELDS", "FORMAT_TASKS", "IGNORE_INDEX", "TRUNCATION", "Row", "Rows", "TokenizedData", "batch_order",
           "check_rows", "collate", "describe_row", "detect_format", "infer_task", "label_vocabulary", "left_pad",
           "load_records", "pad_rows", "shard", "tokenize"]
