"""Feature analysis: every latent of a trained dictionary read on the validation rows.

``stats`` makes one pass over the rows and keeps the codes as sparse (row, feature, value)
entries; every statistic is then computed exactly from them. ``examples`` turns the top and
quantile rows into compact example lists with their context; ``views`` renders the instances
the examples refer to in the subject's own terms (text, TSP, tensor); ``analyze`` writes the
files (see docs/formats.md, "Feature analysis").
"""
