"""lm-evaluation-harness backend `fusiontree`: a FusionTree checkpoint with its own kernels and caches.

    python launch/lm_harness.py --model fusiontree --model_args checkpoint=runs/x --tasks fusiontree_local \\
        --include_path configs/lm_eval --batch_size 8
    # or in Python: import fusiontree.hf.lm_eval_backend, then lm_eval.simple_evaluate(model="fusiontree", ...)

Model args: checkpoint (checkpoint or run directory), device (auto | cpu | cuda), kernels (config:
the checkpoint's backends, auto per device; reference: the PyTorch reference ops), tokenizer (a
SentencePiece .model; default the run's), add_bos_token (default false: FusionTree trains on
documents without bos), max_length (default model.max_seq_len), max_gen_toks (256).

The scoring follows lm-eval's own `hf` backend request by request (token ids, truncation, the
prefix token of an empty context, rolling windows, stop sequences), so that `--model fusiontree`
on a checkpoint and `--model hf` on its export give the same scores. Loglikelihood batches are
right-padded (causal: padding after a sequence does not change it); generation batches are
left-padded and decoded with the KV + Mamba caches (`fusiontree.inference.complete`).
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

log = logging.getLogger(__name__)


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@register_model("fusiontree")
class FusionTreeLM(TemplateLM):
    backend = "causal"

    def __init__(self, checkpoint: str, device: str | None = "auto", batch_size: int | str = 1,
                 max_batch_size: int | None = None, kernels: str = "config", tokenizer: str = "",
                 add_bos_token: bool | str = False, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, **kwargs):
        super().__init__()
        from fusiontree.checkpoint import checkpoint_tokenizer, load_checkpoint

        if kwargs:
            raise ValueError(f"unknown fusiontree model_args {sorted(kwargs)}; allowed: checkpoint, device, kernels, "
                             "tokenizer, add_bos_token, max_length, max_gen_toks (and --batch_size)")
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by the fusiontree backend; give a number of rows")
        if kernels not in ("config", "reference"):
            raise ValueError(f"kernels={kernels!r}: use config (the checkpoint's backends) or reference")
        device = device or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device} (lm_eval's default is cuda:0) but no GPU is visible; pass --device cpu")
        self._device = torch.device(device)
        self.ckpt = load_checkpoint(checkpoint, self._device, "reference" if kernels == "reference" else None)
        self.model = self.ckpt.model
        self.sp = checkpoint_tokenizer(self.ckpt, tokenizer)
        if self.sp.vocab_size() != self.model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.sp.vocab_size()} ids, the model {self.model.cfg.vocab_size}; "
                             "pass tokenizer=PATH.model (the one the model was trained with)")
        from fusiontree.hf.tokenizer import ExportDecoder

        # Generated text is decoded as the exported tokenizer decodes it (the same text for the
        # same tokens as `--model hf` on the export; see ExportDecoder).
        if self.sp.kind != "sentencepiece":
            raise ValueError(f"the fusiontree backend decodes as the Hugging Face export does, which converts "
                             f"SentencePiece models; this checkpoint's tokenizer is {self.sp.name}")
        self._decode = ExportDecoder(self.sp.data)
        self.batch_size = int(batch_size)
        self.add_bos_token = _bool(add_bos_token)
        self._max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        log.info("fusiontree backend: %s on %s, kernels %s, batch %d", self.ckpt.path, self._device,
                 self.model.kernels.describe(), self.batch_size)

    # ---------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        # the token an empty context is scored after (lm-eval's hf backend: bos when there is one)
        return self.sp.bos_id()

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.ckpt.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.sp.encode(string)
        if add_special_tokens is not False and self.add_bos_token:
            ids = [self.sp.bos_id()] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self._decode(tokens)

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids). Returns
        (sum of the continuation's log-probabilities, whether it is the greedy continuation)."""
        L = self.max_length
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="fusiontree loglikelihood")
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            inps = []
            for i in rows:
                _, ctx, cont = requests[i]
                if not ctx or not cont or len(cont) > L:
                    raise ValueError(f"request {i}: need a non-empty context and a continuation of 1..{L} tokens")
                inps.append((ctx + cont)[-(L + 1):][:-1])  # the last token is only a target
            ids = torch.zeros(len(rows), max(map(len, inps)), dtype=torch.long)
            for b, inp in enumerate(inps):
                ids[b, :len(inp)] = torch.tensor(inp)
            logp = F.log_softmax(self.model(ids.to(self.device)).logits.float(), dim=-1)
            for b, i in enumerate(rows):
                cont = requests[i][2]
                inplen = len(inps[b])
                rows_logp = logp[b, inplen - len(cont):inplen]  # the positions that predict the continuation
                target = torch.tensor(cont, device=self.device)
                ll = rows_logp.gather(-1, target[:, None]).sum()
                greedy = bool((rows_logp.argmax(-1) == target).all())  # host sync: one per request
                out[i] = (float(ll), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                bar.update(1)
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from fusiontree.inference import complete

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.sp.id_to_token(self.eot_token_id)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="fusiontree generate_until")
        for members in groups.values():
            kw = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_new = kw.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                       for i in members}
            ordered = sorted(members, key=lambda i: -len(prompts[i]))
            for s in range(0, len(ordered), self.batch_size):
                rows = ordered[s:s + self.batch_size]
                new = complete(self.model, [prompts[i] for i in rows], max_new, self.eot_token_id,
                               stop=lambda toks: any(u and u in self.tok_decode(toks) for u in until),
                               temperature=temperature, top_p=top_p)
                for i, toks in zip(rows, new):
                    out[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                    bar.update(1)
        bar.close()
        return out
