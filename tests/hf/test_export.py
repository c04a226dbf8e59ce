"""The export equals the model it came from: logits, greedy generation, token ids.

Every comparison runs the export in a fresh process that has only torch and transformers (no
FusionTree, no hub): `run_hf` in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from fusiontree.hf.export import export_hf
from fusiontree.inference import generate
from fusiontree.hf.checkpoints import read_checkpoint
from tests.hf.conftest import LAYOUTS, VOCAB, layout_model, run_hf

N_NEW = 24  # prompt 20 + 24 tokens: past the debug preset's window of 16
TOLERANCE = 1e-4  # fp32 logits

# Tabs, runs of spaces, non-ASCII, characters outside the vocabulary (byte fallback), text that
# looks like special tokens, control characters, newlines.
TEXTS = [
    "def f(x):\n\treturn x  +  1\n",
    "\t\tindented\twith\ttabs\n    and spaces   \n",
    "héllo wörld — naïve café, ñandú, Ærøskøbing",
    "中文字符 日本語 한국어 🙂🚀 \u2603 \U0001F9EC",
    "<s> not bos </s> not eos <pad><unk>",
    "x = 12345678901234567890\n\n\n",
    "\x00\x07\x1b[0m control",
    " leading space", "trailing space ", "",
    "▁ a literal lower one eighth block ▁▁",
]

PARITY_SCRIPT = '''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "spec.json"))
out = {}
for name, job in spec.items():
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=True)
    ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        gen = {}
        for use_cache in (True, False):
            gen[use_cache] = model.generate(ids, attention_mask=mask, max_new_tokens=job["n_new"], do_sample=False,
                                            use_cache=use_cache, eos_token_id=None, pad_token_id=0)
    out[name] = {"logits": logits, "gen_cached": gen[True], "gen_uncached": gen[False],
                 "dtype": str(next(model.parameters()).dtype), "class": type(model).__name__,
                 "ids": [tok.encode(t) for t in job["texts"]], "decoded": [tok.decode(tok.encode(t)) for t in job["texts"]],
                 "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id],
                 "random_decoded": [tok.decode(ids, skip_special_tokens=True) for ids in job.get("random_ids", [])]}
torch.save(out, "results.pt")
'''


# Arbitrary id sequences (what an untrained model generates): unk, control ids, byte pieces that
# are not valid UTF-8.
_g = torch.Generator().manual_seed(5)
RANDOM_IDS = [torch.randint(0, VOCAB, (int(n),), generator=_g).tolist() for n in torch.randint(1, 40, (300,), generator=_g)]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 20 tokens; the second left-padded by 6 (a batch of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    return ids, mask


def run_exports(tmp_path, jobs: dict[str, dict]) -> dict:
    (tmp_path / "spec.json").write_text(json.dumps(jobs))
    run_hf(PARITY_SCRIPT, tmp_path)
    return torch.load(tmp_path / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def trained_export(trained_run, tmp_path_factory) -> tuple[Path, dict]:
    """The trained run's export, with a shard size small enough to split the weights."""
    out = tmp_path_factory.mktemp("trained_export") / "hf"
    return out, export_hf(trained_run, out, max_shard_size="100KB")


@pytest.fixture(scope="module")
def layout_results(layout_exports, trained_export, tmp_path_factory):
    """Every export's outputs, computed in one isolated process."""
    ids, mask = _batch()
    jobs = {name: {"dir": str(hf), "ids": ids.tolist(), "mask": mask.tolist(), "n_new": N_NEW, "texts": TEXTS,
                   "random_ids": RANDOM_IDS if name == "parallel-channel" else []}
            for name, (_, hf) in layout_exports.items()}
    ids, mask = _batch(1)
    jobs["trained-run"] = {"dir": str(trained_export[0]), "ids": ids.tolist(), "mask": mask.tolist(), "n_new": 8,
                           "texts": TEXTS[:2]}
    return run_exports(tmp_path_factory.mktemp("parity"), jobs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_logits_and_greedy_tokens_equal_fusiontree(layout, layout_results):
    got = layout_results[layout]
    assert got["class"] == "FusionTreeForCausalLM" and got["dtype"] == "torch.float32"
    model = layout_model(layout)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (got["logits"] - ref).abs()[real].max().item()
    assert diff <= TOLERANCE, f"{layout}: max |logit difference| {diff:.3g} on real tokens"
    for use_cache in (True, False):
        ours = generate(model, ids, N_NEW, use_cache=use_cache, attention_mask=mask)
        for key in ("gen_cached", "gen_uncached"):
            assert torch.equal(got[key], ours), f"{layout}: HF generate ({key}) != FusionTree (use_cache={use_cache})"


def test_export_tokenizer_gives_sentencepiece_ids(layout_results, hf_shards):
    sp = spm.SentencePieceProcessor(model_file=str(hf_shards / "tokenizer.model"))
    got = layout_results["parallel-channel"]
    assert got["special"] == [sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()] == [2, 3, 0, 1]
    for text, ids, decoded in zip(TEXTS, got["ids"], got["decoded"]):
        assert ids == sp.encode(text), f"ids differ on {text!r}"
        assert decoded == sp.decode(ids), f"decode differs on {text!r}"
        if "\u2581" not in text:  # SentencePiece itself decodes a literal "▁" as a space
            assert decoded == text
    # the texts do exercise byte fallback (tabs too, in this small vocabulary) and the newline piece
    pieces = {sp.id_to_piece(i) for t in TEXTS for i in sp.encode(t)}
    assert {"<0x09>", "<0xF0>", "\n"} <= pieces


def test_export_of_a_trained_run_in_shards(trained_run, trained_export, layout_results):
    """A run directory resolves to its latest checkpoint; a small shard size splits the weights
    over several safetensors files with transformers' index, and they load as one model."""
    out, summary = trained_export
    assert summary["step"] == 6 and summary["weights_from"] == "model.pt"
    assert len([f for f in summary["weight_files"] if f.endswith(".safetensors")]) > 3
    assert (out / "model.safetensors.index.json").is_file()
    weights = read_checkpoint(trained_run)
    from fusiontree.models import HybridLanguageModel

    model = HybridLanguageModel(weights.cfg.model).eval()
    model.load_state_dict(weights.state)
    ids, mask = _batch(1)
    got = layout_results["trained-run"]
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    assert (got["logits"] - ref).abs()[mask.bool()].max().item() <= TOLERANCE
    assert torch.equal(got["gen_cached"], generate(model, ids, 8, attention_mask=mask))


def test_export_refuses_bad_input(layout_exports, tmp_path, hf_shards):
    with pytest.raises(ValueError, match="is not a checkpoint"):
        export_hf(tmp_path, tmp_path / "out")
    ckpt, hf = layout_exports["parallel-channel"]
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_hf(ckpt, hf)
    other = tmp_path / "tok.model"
    other.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        export_hf(ckpt, tmp_path / "out2", tokenizer=other)


def test_export_decoder_decodes_any_ids_like_the_exported_tokenizer(layout_results, hf_shards):
    """The lm-eval backend's text of generated tokens is the export's text of the same tokens."""
    from fusiontree.hf.tokenizer import ExportDecoder

    decode = ExportDecoder((hf_shards / "tokenizer.model").read_bytes())
    got = layout_results["parallel-channel"]["random_decoded"]
    assert len(got) == len(RANDOM_IDS)
    assert [decode(ids) for ids in RANDOM_IDS] == got
    sp = spm.SentencePieceProcessor(model_file=str(hf_shards / "tokenizer.model"))
    assert any(sp.decode(ids) != text for ids, text in zip(RANDOM_IDS, got))  # the ids reach the differences


def test_export_refuses_a_cache_that_does_not_fit():
    from transformers.cache_utils import DynamicCache

    from fusiontree.hf.configuration_fusiontree import FusionTreeConfig
    from fusiontree.hf.convert import hf_config_dict
    from fusiontree.hf.modeling_fusiontree import FusionTreeForCausalLM

    model = layout_model("parallel-channel")
    hf = FusionTreeForCausalLM(FusionTreeConfig(**hf_config_dict(model.cfg))).eval()
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="DynamicCache\\(config=model.config\\)"):
        hf(ids, cache=DynamicCache())
    out = hf(ids, cache=DynamicCache(config=hf.config))
    assert out.cache.fusiontree_positions.tolist() == [[0, 1, 2, 3, 4]]
