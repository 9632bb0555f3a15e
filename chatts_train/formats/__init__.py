"""The files a training run leaves that using its result reads: the adapter folder and the run record."""
