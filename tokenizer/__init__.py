"""hataori.tokenizer: corpora, SentencePiece training and evaluation, token shards."""
