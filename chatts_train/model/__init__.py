"""The ChatTS model and its inputs: the model class and its config, the processor that builds the official
inputs (prompt prefixes, series encoding, `<ts>` patches), batching of encoded samples, the published
configs, and a checkpoint folder's weight files. Imports nothing of the package but errors and tokens."""
