"""Training data: indexing and checking JSONL datasets (`indexing`), and the sampler that orders them into
micro-batches and optimizer steps. Built on the model's processor."""
