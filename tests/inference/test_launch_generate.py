"""launch/generate.py end to end on a checkpoint trained in the test: the tokens of
`fusiontree.inference.generate`, streamed as they come, batches from a file, and a one-line
error with exit status 2 for each kind of bad input."""

import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint
from fusiontree.inference import generate
from fusiontree.models import HybridLanguageModel
from launch.generate import main
from tests.inference.conftest import MAX_SEQ_LEN, make_shards


class Recorder:
    """A stdout that notes, for every write, how many model forwards had run by then."""

    def __init__(self, forwards: list):
        self.forwards, self.writes = forwards, []

    def write(self, text: str) -> None:
        if text:
            self.writes.append((len(self.forwards), text))

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


@pytest.fixture
def counted_forwards(monkeypatch) -> list:
    calls: list = []
    forward = HybridLanguageModel.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(HybridLanguageModel, "forward", counting)
    return calls


def reference_tokens(run, sp, prompt: str, n: int, **kw) -> list[int]:
    """What `generate` gives for this prompt alone (BOS first), cut at EOS."""
    model = load_checkpoint(run).model
    ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
    row = generate(model, ids, n, eos_token_id=sp.eos_id(), **kw)[0, ids.shape[1]:].tolist()
    return row[:row.index(sp.eos_id())] if sp.eos_id() in row else row


def test_greedy_stream_is_generate_token_by_token(trained_run, sp, tmp_path, counted_forwards):
    prompt, n = "def scan(string, idx):\n", 40
    out = Recorder(counted_forwards)
    assert main(["--checkpoint", str(trained_run), "--prompt", prompt, "--max-new-tokens", str(n),
                 "--output", str(tmp_path / "out.json")], out=out) == 0
    want = reference_tokens(trained_run, sp, prompt, n)
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["rows"][0]["new_tokens"] == want and len(want) == n  # no EOS this early
    assert record["tokens_per_s"] > 0 and record["new_tokens"] == n
    assert record["first_decode_step_s"] > 0 and record["decode_tokens_per_s"] > 0
    assert out.text == prompt + sp.decode(want) + "\n"
    # Streaming: the prompt before any forward, then each token's text right after the forward
    # that produced it (prefill = forward 1) and before the next one.
    chunks = [(c, t) for c, t in out.writes[1:-1]]
    assert out.writes[0] == (0, prompt)
    assert [c for c, _ in chunks] == list(range(1, n + 1))
    assert [t for _, t in chunks] == [sp.decode([tok]) for tok in want]


def test_prompt_file_is_one_left_padded_batch(trained_run, sp, tmp_path):
    prompts = ["import json", "def f(x): return x", "class JSONDecoder(object):"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    out = Recorder([])
    assert main(["--checkpoint", str(trained_run), "--prompt-file", str(path), "--max-new-tokens", "12",
                 "--output", str(tmp_path / "out.json")], out=out) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["prompt"] for r in rows] == prompts
    assert len({len(r["prompt_tokens"]) for r in rows}) == 3  # different lengths: padding was needed
    for i, (p, r) in enumerate(zip(prompts, rows)):
        assert r["new_tokens"] == reference_tokens(trained_run, sp, p, 12)  # each row as if alone
        assert f"--- {i + 1} of 3 ---\n{p}{sp.decode(r['new_tokens'])}\n" in out.text


def test_sampling_uses_the_seed_and_the_project_sampler(trained_run, sp, tmp_path):
    args = ["--checkpoint", str(trained_run), "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0.9",
            "--top-k", "50", "--top-p", "0.95"]
    runs = []
    for seed in (3, 3, 4):
        out_json = tmp_path / f"out{len(runs)}.json"
        assert main([*args, "--seed", str(seed), "--output", str(out_json)], out=Recorder([])) == 0
        runs.append(json.loads(out_json.read_text())["rows"][0]["new_tokens"])
    want = reference_tokens(trained_run, sp, "def ", 16, temperature=0.9, top_k=50, top_p=0.95,
                            generator=torch.Generator().manual_seed(3))
    assert runs[0] == runs[1] == want
    assert runs[2] != runs[0]


def damaged_copy(run, tmp_path, how: str):
    src = sorted((run / "checkpoints").glob("step_*"))[-1]
    dst = tmp_path / f"ckpt_{how}"
    shutil.copytree(src, dst)
    data = (dst / "model.pt").read_bytes()
    if how == "truncated":  # a size meta.json does not list
        (dst / "model.pt").write_bytes(data[: len(data) // 2])
    else:  # same size, unreadable content
        (dst / "model.pt").write_bytes(b"\0" * len(data))
    return dst


def other_tokenizer(tmp_path, vocab_size: int):
    return make_shards(tmp_path / f"other_{vocab_size}", package="email", seed=9, vocab_size=vocab_size) / \
        "tokenizer.model"


@pytest.mark.parametrize("case", ["too_long", "too_long_with_new_tokens", "temperature", "top_p", "top_k",
                                  "top_k_greedy", "max_new_tokens", "tokenizer_vocab", "tokenizer_other",
                                  "missing", "truncated", "unreadable", "blank_line", "no_file", "cuda_graph",
                                  "no_compile"])
def test_bad_input_is_one_line_and_exit_2(case, trained_run, tmp_path, capsys):
    ck = ["--checkpoint", str(trained_run)]
    prompt = ["--prompt", "def "]
    long_text = "def f(x): return x\n" * 60  # far more than 256 tokens
    path = tmp_path / "prompts.txt"
    path.write_text("import json\n\ndef f(x):\n")
    args, match = {
        "too_long": ([*ck, "--prompt", long_text], "past the model's max_seq_len 256: shorten it to fewer"),
        "too_long_with_new_tokens": ([*ck, *prompt, "--max-new-tokens", str(MAX_SEQ_LEN)],
                                     r"pass --max-new-tokens \d+ or less"),
        "temperature": ([*ck, *prompt, "--temperature", "-1"], r"temperature=-1.0 must be >= 0"),
        "top_p": ([*ck, *prompt, "--temperature", "1", "--top-p", "0"], r"top_p=0.0 must lie in \(0, 1\]"),
        "top_k": ([*ck, *prompt, "--temperature", "1", "--top-k", "-2"], r"top_k=-2 must be >= 0"),
        "top_k_greedy": ([*ck, *prompt, "--top-k", "5"], "--temperature 0 is greedy decoding"),
        "max_new_tokens": ([*ck, *prompt, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        "tokenizer_vocab": ([*ck, *prompt, "--tokenizer", str(other_tokenizer(tmp_path, 350))],
                            "has 350 ids but the checkpoint's model has 400"),
        "tokenizer_other": ([*ck, *prompt, "--tokenizer", str(other_tokenizer(tmp_path, 400))],
                            "is not the one .* was trained with"),
        "missing": (["--checkpoint", str(tmp_path / "nowhere"), *prompt], "is not a checkpoint"),
        "truncated": (["--checkpoint", str(damaged_copy(trained_run, tmp_path, "truncated")), *prompt],
                      "model.pt has \\d+ bytes, meta.json says \\d+ \\(truncated or damaged\\)"),
        "unreadable": (["--checkpoint", str(damaged_copy(trained_run, tmp_path, "unreadable")), *prompt],
                       "model.pt does not have the content it was saved with"),
        "blank_line": ([*ck, "--prompt-file", str(path)], "line 2 of .* is empty"),
        "no_file": ([*ck, "--prompt-file", str(tmp_path / "none.txt")], "cannot read --prompt-file"),
        "cuda_graph": ([*ck, *prompt, "--device", "cpu", "--cuda-graph"], "--cuda-graph replays decode steps on a GPU"),
        "no_compile": ([*ck, *prompt, "--no-compile"], "--no-compile only applies to the --cuda-graph step"),
    }[case]
    out = Recorder([])
    assert main(args, out=out) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("generate.py: error: ") and re.search(match, err[-1]), err[-3:]
    assert not any(line.startswith("Traceback") for line in err)
    assert out.text == ""  # nothing half-generated on stdout


def test_the_first_decode_step_is_timed_apart_from_the_decode_rate(caplog):
    """The first decode step compiles (and with --cuda-graph captures) once: its seconds are
    reported on their own, not averaged into the tokens/s of the steps after it."""
    from types import SimpleNamespace

    from launch.generate import parse_args, stats

    a, _ = parse_args(["--checkpoint", "x", "--prompt", "p", "--cuda-graph"])
    ckpt = SimpleNamespace(path="x", model=SimpleNamespace(kernels=SimpleNamespace(describe=lambda: "k")))
    t0 = 100.0
    times = [t0 + 2.0, t0 + 32.0] + [t0 + 32.0 + 0.01 * i for i in range(1, 9)]  # prefill, build, 8 steps
    rows, new = [[1, 5], [1, 6, 7]], [[3] * 10, [4] * 10]
    with caplog.at_level("INFO", logger="fusiontree.generate"):
        rec = stats(a, ckpt, ["p", "q"], rows, new, ["", ""], t0, times)
    assert rec["first_token_s"] == pytest.approx(2.0) and rec["first_decode_step_s"] == pytest.approx(30.0)
    assert rec["decode_tokens_per_s"] == pytest.approx(8 * 2 / 0.08)  # 8 steps of a batch of 2
    assert rec["tokens_per_s"] == pytest.approx(20 / 32.08)
    assert "first decode step 30.000 s (compile and capture of the CUDA graph included)" in caplog.text
    one = stats(a, ckpt, ["p"], rows[:1], new[:1], [""], t0, times[:1])  # one new token: no decode step
    assert one["first_decode_step_s"] is None and one["decode_tokens_per_s"] is None


@pytest.mark.parametrize("how", ["flag", "run_config", "none"])
def test_compile_cache_dir_holds_the_kernels_and_autotuning_choices(how, trained_run, tmp_path, monkeypatch):
    """--compile-cache-dir, else the run's train.compile_cache_dir, points Inductor's and Triton's
    caches (and Triton's autotuning cache) at one directory; with neither they stay where they were."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_CACHE_AUTOTUNING")
    before = str(tmp_path / "before")
    for k in keys:  # restored after the test, whatever main sets
        monkeypatch.setenv(k, before)
    cache = tmp_path / "cache"
    extra = {"flag": ["--compile-cache-dir", str(cache)], "run_config": [f"--train.compile_cache_dir={cache}"],
             "none": []}[how]
    assert main(["--checkpoint", str(trained_run), "--prompt", "def ", "--max-new-tokens", "2", *extra],
                out=Recorder([])) == 0
    if how == "none":
        assert [os.environ[k] for k in keys] == [before] * 3 and not cache.exists()
    else:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache.resolve() / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(cache.resolve() / "triton")
        assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1" and (cache / "inductor").is_dir()


def test_a_checkpoint_keeps_its_tokenizer_and_reads_it_away_from_its_shards(trained_run, shards, tmp_path,
                                                                            monkeypatch):
    """The trainer saves the run's tokenizer into each checkpoint (hashed with the other files),
    and a checkpoint moved away from its shards, read from another directory, still finds it."""
    ckpt = sorted((trained_run / "checkpoints").glob("step_*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (ckpt / meta["tokenizer_file"]).read_bytes() == (shards / "tokenizer.model").read_bytes()
    assert meta["files"][meta["tokenizer_file"]]["sha256"] == meta["tokenizer_sha256"]
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    ck = load_checkpoint(moved)
    # As after `make run` read from elsewhere: a relative tokenizer path and no shards in reach.
    away = dataclasses.replace(ck, cfg=dataclasses.replace(ck.cfg, data=dataclasses.replace(
        ck.cfg.data, shards_dir=str(tmp_path / "gone"))), meta={**ck.meta, "tokenizer": "data/shards/tokenizer.model"})
    monkeypatch.chdir(tmp_path)
    tok = checkpoint_tokenizer(away)
    assert tok.sha256 == meta["tokenizer_sha256"] and tok.name == str(moved / "tokenizer.model")
    (moved / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):  # what such a checkpoint met before
        checkpoint_tokenizer(away)
