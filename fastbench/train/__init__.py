"""Training: ``fastbench train`` (fastbench.train.cli) and the same pieces for Python users.

For HF ``Trainer`` / TRL users::

    from fastbench.train import tokenize_records, PackingCollator
    examples = tokenize_records(records, tokenizer, max_seq_length=2048)   # labels on assistant turns only
    trainer = Trainer(model, args, train_dataset=examples,
                      data_collator=PackingCollator(2048, tokenizer.pad_token_id))

Importing this package loads no torch; the modules import it when they run.
"""
from fastbench.train.data import (FORMATS, IGNORE_INDEX, DataError, detect_format, encode_record, read_records,
                                  render_chat, tokenize_records)
from fastbench.train.packing import MicroBatch, PackingCollator, pack_examples, pack_rows, packed_batch, padded_batch

__all__ = ["FORMATS", "IGNORE_INDEX", "DataError", "MicroBatch", "PackingCollator", "detect_format", "encode_record",
           "pack_examples", "pack_rows", "packed_batch", "padded_batch", "read_records", "render_chat",
           "tokenize_records"]
