# Runs the official Wanda / SparseGPT code (locuslab/wanda, lib/ unchanged) on the default model
# with the golden calibration ids, times it, and saves the whole pruned model, so that its
# perplexity can be measured with `lopper eval` under exactly lopper's protocol. Not part of
# lopper or its tests; it is how results/official_side_by_side.jsonl and
# results/official_reruns.jsonl were made.
#
#   python scripts/official_prune.py WANDA_DIR wanda|sparsegpt GGUF_DIR GGUF_FILE OUT.safetensors
#
# WANDA_DIR: a checkout of https://github.com/locuslab/wanda (commit 8e8fc87 was used).
# Environment: torch 2.15.0, transformers 5.24.0, accelerate, gguf, safetensors (the golden
# README's versions); THREADS (default 2), NSAMPLES (default 128), PATTERN=2:4 for N:M.
# Then: copy config.json / tokenizer files from any `lopper prune` output next to OUT as
# model.safetensors and run `lopper eval --model THAT_DIR`.
#
# Only the plumbing is adapted: CPU instead of CUDA, the GGUF model, the golden calibration ids
# instead of the repository's C4 loader, and RoPE cos/sin passed to each decoder layer (the
# official loop calls layers directly, and transformers 5 no longer computes them inside).
import os
import sys
import time
import types

import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.empty_cache = lambda *a, **k: None
from safetensors.torch import load_file, save_file  # noqa: E402
import transformers  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

wanda_dir, method, gguf_dir, gguf_file, out = sys.argv[1:6]
sys.path.insert(0, wanda_dir)
ds = types.ModuleType("datasets")
ds.load_dataset = None
sys.modules["datasets"] = ds  # calibration comes from the golden ids
import lib.prune as P  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
golden = os.path.join(here, "..", "..", "shared", "golden", "calib_c4_128x512.safetensors")
ids = load_file(os.environ.get("CALIB_IDS", golden))["input_ids"].long()
P.get_loaders = lambda *a, **k: ([(ids[j : j + 1], None) for j in range(k["nsamples"])], None)

model = transformers.AutoModelForCausalLM.from_pretrained(
    gguf_dir, gguf_file=gguf_file, dtype=torch.float32
)
model.eval()
model.seqlen = ids.shape[1]
model.hf_device_map = {}
rot = model.model.rotary_emb
orig = modeling_llama.LlamaDecoderLayer.forward


def fwd(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kw):
    if position_embeddings is None:
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
        position_embeddings = rot(hidden_states, position_ids)
    return orig(
        self,
        hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
        **kw,
    )


modeling_llama.LlamaDecoderLayer.forward = fwd
args = types.SimpleNamespace(
    nsamples=int(os.environ.get("NSAMPLES", "128")), seed=0, sparsity_ratio=0.5, use_variant=False
)
pn, pm = (2, 4) if os.environ.get("PATTERN") == "2:4" else (0, 0)
t = time.time()
if method == "wanda":
    P.prune_wanda(args, model, None, torch.device("cpu"), prune_n=pn, prune_m=pm)
else:
    P.prune_sparsegpt(args, model, None, torch.device("cpu"), prune_n=pn, prune_m=pm)
dt = time.time() - t
print(f"OFFICIAL {method} prune seconds {dt:.1f}; sparsity {P.check_sparsity(model):.5f}", flush=True)
sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
save_file(sd, out)
print(f"saved {len(sd)} tensors to {out}", flush=True)
