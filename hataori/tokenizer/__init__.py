"""hataori.tokenizer: SentencePiece training, evaluation and extension, the fast tokenizer, token shards."""
