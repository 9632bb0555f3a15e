"""Using the result: generation with an adapter, evaluation of answers, merging the adapter into the base."""
