"""The specs: their models (every field, default and bound), loading with file:line errors, validation, the project's layout and params.yaml index, and the generated reference.

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
