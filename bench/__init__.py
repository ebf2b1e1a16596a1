"""Benchmarks: orchestra against plain Keras and the hand-written Ray Train
recipe, on the same model, data, batch size and epochs. `python -m bench`."""
