"""Training and fine-tuning of the IconMatting head: ``python -m iconmatting_core train`` (``cli``).

data (layouts, checks, sampling) -> trainer (frozen SD features, head step, DDP) with losses (the
authors' loss terms) and state (head files, checkpoints, metrics).
"""
