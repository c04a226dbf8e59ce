"""The [hf] extra stays optional: the training path imports none of its packages."""

import subprocess
import sys

from tests.hf.conftest import ROOT

HF_EXTRA = ("transformers", "lm_eval", "safetensors", "accelerate", "datasets")


def test_training_path_does_not_import_the_hf_extra():
    code = (
        "import sys; sys.argv = ['train.py']; sys.path.insert(0, 'launch')\n"
        "import importlib; importlib.import_module('train')\n"
        "import fusiontree.models, fusiontree.checkpoint, fusiontree.train.trainer, fusiontree.train.losses, "
        "fusiontree.data.loader, fusiontree.parallel, fusiontree.eval.tasks\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HF_EXTRA)!r}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
