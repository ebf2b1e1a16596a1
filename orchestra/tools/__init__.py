"""Tools around jobs: TensorBoard's server, loss/accuracy plots, sample data."""
