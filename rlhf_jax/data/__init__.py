"""Preference and prompt data: reading, validation, tokenization, batching.

Pipeline::

  loaded = load_examples("prefs.jsonl")            # or load_hh_rlhf(paths)
  loaded.drops.summary()                           # what was dropped, why
  ds = tokenize_preferences(loaded.examples, tok,
                            max_prompt_length=P, max_response_length=T)
  ds.truncation.summary()                          # what was cut
  # drop_ties=True: pairs identical once tokenized left out (ds.ties)
  train, evl = train_eval_split(len(ds), eval_size=0.1, seed=0)
  it = BatchIterator(ds.subset(train), global_batch_size=B, seed=0,
                     process_index=p, process_count=H)
  for lb in it: ...  # lb.batch: PreferenceBatch of numpy arrays [B/H, ...]
  it.state_dict()    # JSON-able position, saved with checkpoints

Errors are ``DataError`` (a ``ValueError``) naming file, line and field.
"""

from rlhf_jax.data.errors import (
  DROP_REASONS,
  TIE_REASONS,
  DataError,
  DroppedRow,
  DropReport,
  NoPromptRoomError,
  PromptTooLongError,
  TruncationReport,
)
from rlhf_jax.data.examples import (
  ASSISTANT_MARKER,
  FORMATS,
  ChatTemplate,
  CompletionExample,
  LoadedExamples,
  PreferencePair,
  PromptExample,
  RankedExample,
  UnpairedExample,
  detect_format,
  detected,
  hh_messages,
  load_examples,
  row_kind,
  split_hh_transcript,
)
from rlhf_jax.data.hh_rlhf import load_hh_rlhf, split_by_rows
from rlhf_jax.data.loader import (
  BatchIterator,
  LoaderBatch,
  epoch_permutation,
  host_slice,
  train_eval_split,
)
from rlhf_jax.data.padding import check_padding, padded_lengths, trim_padding
from rlhf_jax.data.readers import Row, read_jsonl, read_parquet, read_rows
from rlhf_jax.data.tokenize import (
  HFTokenizerAdapter,
  TokenizedDataset,
  Tokenizer,
  UnpairedBatch,
  tokenize_preferences,
  tokenize_prompts,
  tokenize_ranked,
  tokenize_sft,
  tokenize_unpaired,
)

__all__ = [
  "ASSISTANT_MARKER",
  "BatchIterator",
  "ChatTemplate",
  "check_padding",
  "CompletionExample",
  "DROP_REASONS",
  "DataError",
  "DropReport",
  "DroppedRow",
  "FORMATS",
  "HFTokenizerAdapter",
  "LoadedExamples",
  "LoaderBatch",
  "NoPromptRoomError",
  "PreferencePair",
  "PromptExample",
  "PromptTooLongError",
  "RankedExample",
  "Row",
  "TIE_REASONS",
  "TokenizedDataset",
  "Tokenizer",
  "TruncationReport",
  "UnpairedBatch",
  "UnpairedExample",
  "detect_format",
  "detected",
  "epoch_permutation",
  "host_slice",
  "load_examples",
  "load_hh_rlhf",
  "padded_lengths",
  "read_jsonl",
  "read_parquet",
  "read_rows",
  "row_kind",
  "split_by_rows",
  "hh_messages",
  "split_hh_transcript",
  "tokenize_preferences",
  "tokenize_prompts",
  "tokenize_ranked",
  "tokenize_sft",
  "tokenize_unpaired",
  "train_eval_split",
  "trim_padding",
]
