"""The embedded demo's data: controlled sentiment generation on real review snippets.

- :mod:`tasks.demo.settings`  ``DemoSettings``, the ``demo:`` section of the pipeline YAML
- :mod:`tasks.demo.corpus`    the review corpus, fetched from a registry wheel by name, verified, cached
- :mod:`tasks.demo.tokenizer` byte-level BPE trained on it
- :mod:`tasks.demo.base_model` the small causal LM pretrained on it, built once and cached
- :mod:`tasks.demo.prompts`   held-out review beginnings, split like the data layer splits prompts
- :mod:`tasks.demo.oracle`    the VADER sentiment oracle
- :mod:`tasks.demo.annotators`, :mod:`tasks.demo.malformed`, :mod:`tasks.demo.simulator`
  simulated annotators writing feedback files into the landing folder

``python -m tasks.demo`` builds the base model and prints samples. Nothing here imports
Prefect or MLflow.
"""
