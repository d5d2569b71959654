"""hataori.corpus: building corpora (Debian's Japanese documentation, news sentences, Python's docstrings)
and reading them (JSONL and plain text, the validation split) for the tokenizer and shard preparation."""
