"""saeclt: train and evaluate sparse dictionaries (SAEs, transcoders) on a network's activations."""

__version__ = "0.1.0"
