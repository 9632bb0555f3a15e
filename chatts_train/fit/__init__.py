"""Fitting 14B onto the cards: the plan of how a run executes, the DeepSpeed config, building the model into
ZeRO partitions and filling them from the shards, the vocabulary matrices read from ZeRO-3 slices, activations
kept lean, compiled layers, host memory, and CPU collectives. Built on the model; knows nothing of the loop."""
