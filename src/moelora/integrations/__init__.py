"""Integrations with other training frameworks (each needs that framework installed).

- ``moelora.integrations.transformers``: ``MoELoRATrainer``, a ``transformers.Trainer`` that checkpoints
  adapters only, resumes them exactly and trains with the method's optimizer.
"""
