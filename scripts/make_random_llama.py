# A random TinyLlama-1.1B-shaped llama model in bf16 (HF directory, 2.2 GB; 4.4 GB as f32), written
# tensor by tensor, plus 16x256 random calibration ids beside it: a stand-in for a model too big
# to hold comfortably as f32, to measure `lopper prune`'s memory with and without --in-memory
# (README, "Pruning options"). Needs numpy and safetensors.
#
#   python scripts/make_random_llama.py OUT_DIR
import json, os, struct, sys
import numpy as np
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
H, I, L, V, NH, NKV = 2048, 5632, 22, 32000, 32, 4
HD = H // NH
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
       "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": NH,
       "num_key_value_heads": NKV, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu",
       "torch_dtype": "bfloat16"}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
shapes = [("model.embed_tokens.weight", (V, H))]
for i in range(L):
    p = f"model.layers.{i}"
    shapes += [(f"{p}.input_layernorm.weight", (H,)), (f"{p}.self_attn.q_proj.weight", (NH * HD, H)),
               (f"{p}.self_attn.k_proj.weight", (NKV * HD, H)), (f"{p}.self_attn.v_proj.weight", (NKV * HD, H)),
               (f"{p}.self_attn.o_proj.weight", (H, NH * HD)), (f"{p}.post_attention_layernorm.weight", (H,)),
               (f"{p}.mlp.gate_proj.weight", (I, H)), (f"{p}.mlp.up_proj.weight", (I, H)),
               (f"{p}.mlp.down_proj.weight", (H, I))]
shapes += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
header, off = {}, 0
for n, s in shapes:
    b = int(np.prod(s)) * 2
    header[n] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + b]}
    off += b
h = json.dumps(header).encode()
h += b" " * ((8 - (8 + len(h)) % 8) % 8)
rng = np.random.default_rng(0)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for n, s in shapes:
        if "norm" in n:
            x = np.ones(s, np.float32)
        else:
            x = rng.standard_normal(s, dtype=np.float32) * 0.02
        f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
ids = rng.integers(0, V, size=(16, 256), dtype=np.int64)
from safetensors.numpy import save_file
save_file({"input_ids": ids}, os.path.join(out, "..", "calib_16x256.safetensors"))
print("params", sum(int(np.prod(s)) for _, s in shapes))
