"""From a checked spec to what trains: the Keras model, the data
pipelines (arrays and image folders) and the performance defaults."""
