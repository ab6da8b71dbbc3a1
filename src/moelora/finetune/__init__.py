"""The fine-tuning application: the ``moelora`` command line, run configuration, trainer, data, evaluation.

Built on the core (``moelora``, ``moelora.optim``) and on ``transformers``; needs the ``train`` extra
(``pip install 'moelora[train]'``).

- ``run_config``: ``RunConfig``, the typed run configuration (YAML, ``--set`` overrides);
- ``trainer``: ``Trainer`` (``setup`` / ``fit`` / ``evaluate``, callbacks, ``TrainResult``);
- ``data``: tasks, prompts, collation; ``eval``: metrics, intervals, scoring, generation;
- ``base_models``, ``tasks``, ``loss``, ``batching``, ``optimizers``, ``schedule``, ``checkpoint``,
  ``distributed``, ``run_summary``: the trainer's parts; ``cli``: the command line.
"""

from ..extras import require_extra

require_extra("train", "moelora.finetune (the training command)")
