"""Tools that built the default model: corpus, tokenizer, plain-PyTorch Mixtral, training loop.
Offline and reproducible; the serving path never imports this package."""
