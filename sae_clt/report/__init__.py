"""The experiment report (Markdown and HTML) and its templates.

Kept free of imports: what it imported would count as code every stage using the folder depends on.
"""
