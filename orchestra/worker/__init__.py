"""What runs on each Ray Train worker: the training loop, its pipelines,
the Keras callback that talks to the driver, and checkpoint saving."""
