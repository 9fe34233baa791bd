"""The pipeline's stages: one module per stage, each with ``run(spec_path)``, and the table that
lists them (``table.STAGES``). dvc.yaml, ``saeclt stage`` and ``saeclt run`` all come from the table.

Kept free of imports: every stage module runs this file, so what it imports would count as code
every stage depends on.
"""
