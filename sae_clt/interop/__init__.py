"""Formats of other tools: SAELens / sparsify dictionaries (convert, compare) and attribution-graph edges.

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
