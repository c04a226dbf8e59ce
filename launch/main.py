"""The embedded default job: train the `debug` preset for a few steps on CPU, then generate
with the KV + Mamba caches. Text is read as bytes (ids 0-255), so no tokenizer is needed.

    python launch/main.py [--config FILE] [--train.steps=40 ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusiontree.config import dump_config, load_config  # noqa: E402
from fusiontree.models import HybridLanguageModel  # noqa: E402
from fusiontree.ops import resolve_kernels  # noqa: E402
from fusiontree.train.losses import HybridModelLoss  # noqa: E402

log = logging.getLogger("fusiontree.main")


def byte_corpus(min_bytes: int = 1 << 20) -> torch.Tensor:
    """Bytes of this interpreter's standard library sources: a corpus every machine has."""
    import sysconfig

    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= min_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (default: the embedded debug run)")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, overrides)
    print(dump_config(cfg))
    if cfg.model.vocab_size < 256:
        raise ValueError("the byte-level default job needs model.vocab_size >= 256")
    torch.manual_seed(cfg.seed)
    kernels = resolve_kernels(cfg.kernels, "cpu")
    log.info("kernels: %s", kernels.describe())
    model = HybridLanguageModel(cfg.model, kernels)
    loss_fn = HybridModelLoss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr_peak, weight_decay=cfg.train.weight_decay)
    data = byte_corpus()
    B, T = cfg.train.micro_batch_size, cfg.train.seq_len
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        starts = torch.randint(0, len(data) - T, (B,), generator=g)
        ids = torch.stack([data[s:s + T] for s in starts])
        out = model(ids)
        loss, parts = loss_fn(out.logits, ids, out.gates)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        if step % cfg.train.log_every_steps == 0 or step == 1:
            tps = step * B * T / (time.perf_counter() - t0)
            log.info("step %d loss %.4f ce %.4f gate_reg %.4f grad_norm %.3f tokens/s %.0f",
                     step, loss.item(), parts["ce"].item(), parts["gate_reg"].item(), gnorm.item(), tps)
    model.eval()
    prompt = torch.tensor([list(cfg.generate.prompt.encode())])
    out = model.generate(prompt, cfg.generate.max_new_tokens, use_cache=True,
                         temperature=cfg.generate.temperature, top_k=cfg.generate.top_k, top_p=cfg.generate.top_p)
    text = bytes(out[0].clamp(max=255).tolist()).decode("utf-8", errors="replace")
    print("--- generated with the cache ---")
    print(text)


if __name__ == "__main__":
    main()
