"""FusionTree outside this repository: Hugging Face export and import, and lm-evaluation-harness.

- export.py: checkpoint -> transformers model directory (`export_hf`), and back (`import_hf`);
  launch/export_hf.py is its command line.
- configuration_fusiontree.py, modeling_fusiontree.py: the exported model's code (torch and
  transformers only), copied into every export.
- tokenizer.py: the SentencePiece model as a `tokenizers` tokenizer with the same ids.
- convert.py: the one mapping of config fields and weight names; checkpoints.py: the one place
  that reads and writes FusionTree checkpoints for all of the above.
- lm_eval_backend.py: lm-eval's `fusiontree` model; task_data.py: the local task pack's data.

Needs the `hf` extra (transformers, safetensors, lm-eval, accelerate); nothing on the training
path imports this package.
"""
