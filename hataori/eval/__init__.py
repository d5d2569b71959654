"""hataori.eval: evaluation of language models on Japanese benchmarks, offline.

* :mod:`~hataori.eval.tasks`: the tasks (JCommonsenseQA, JNLI, bits per character) and their files;
  the JGLUE files are bundled in ``jglue/`` (CC BY-SA 4.0, see its README.md).
* :mod:`~hataori.eval.templates`: prompt templates, YAML configs in ``configs/eval/``.
* :mod:`~hataori.eval.choice`: multiple-choice scoring by log-likelihood, batched, with few shots.
* :mod:`~hataori.eval.bpc`: loss and bits per character of whole documents, shared with pretraining
  validation (:mod:`hataori.train.validate`).
* :mod:`~hataori.eval.runner`: :func:`~hataori.eval.runner.run_task`, what ``hataori eval`` calls, and
  :class:`~hataori.eval.runner.EvalTaskConfig`, a task pretraining runs at its validations
  (``validation.tasks``; :mod:`hataori.train.validate`), prepared once and scored on every rank.

Evaluation reads models and tokenizers (it imports hataori.model and hataori.tokenizer) and never
hataori.train, which imports it.
"""
