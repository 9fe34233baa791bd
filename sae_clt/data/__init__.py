"""Activations: recording hook points, the sharded store, normalisation and the training loader, text corpora, imported activation files.

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
