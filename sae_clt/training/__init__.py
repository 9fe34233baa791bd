"""Training a dictionary: the loop (``loop.train``) reads top to bottom over a batch iterator;
the step (autograd reference ``step.train_step``, or the fast TopK step), losses, schedules,
the optimiser, initialisation and checkpoints live in their own modules beside it.

Kept free of imports: what it imported would count as code every training stage depends on.
"""
