#!/usr/bin/env python3
"""Independent NumPy reference for Mistral sliding-window attention on tiny-mistral.

Writes tests/fixtures/tiny_mistral_window16.safetensors, which tests/forward_golden.rs and
tests/generate.rs compare lopper against. transformers is not needed (nor available where this
was written), so the script first proves that its own forward pass reproduces transformers'
golden logits of ../shared/golden/tiny/tiny-mistral without a window (the config's
`sliding_window` is null), then reruns it with a window of 16 positions.

The mask is transformers' (`masking_utils.sliding_window_causal_mask_function`: the causal mask
`kv_idx <= q_idx` and the overlay `kv_idx > q_idx - sliding_window`): the query at position i
attends to keys j with i - W < j <= i, i.e. the last W positions including itself.

Run: python3 scripts/sliding_window_ref.py [GOLDEN_DIR]   (needs numpy only)
"""

import json
import os
import struct
import sys

import numpy as np

WINDOW = 16
# Positions of each row kept in the fixture (the last ones: all of them see a cut window).
KEEP_FROM = 64


def read_safetensors(path):
    """Every tensor of a safetensors file as a NumPy array (F32 and I64 only)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(path, tensors, metadata):
    """Write F32 / I64 arrays as a safetensors file."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[name] = {
            "dtype": names[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, theta):
    """HF rotate-half RoPE on x [heads, t, head_dim]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(pos, inv)
    cos = np.cos(np.concatenate([ang, ang], axis=-1))
    sin = np.sin(np.concatenate([ang, ang], axis=-1))
    half = hd // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def forward(w, cfg, ids, window):
    """Float64 logits [t, vocab] of one sequence; `window` None means plain causal."""
    t = len(ids)
    hd = cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps = cfg["rms_norm_eps"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1e4))
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    pos = np.arange(t, dtype=np.float64)
    h = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rmsnorm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(t, nh, hd).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(t, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        group = nh // nkv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = np.where(allowed, s, -np.inf)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        h = h + a @ w[p + "self_attn.o_proj.weight"].T
        x = rmsnorm(h, w[p + "post_attention_layernorm.weight"], eps)
        g = x @ w[p + "mlp.gate_proj.weight"].T
        u = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (g / (1.0 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    h = rmsnorm(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    golden = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "LOPPER_GOLDEN", os.path.join(root, "..", "shared", "golden")
    )
    d = os.path.join(golden, "tiny", "tiny-mistral")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in read_safetensors(os.path.join(d, "model.safetensors")).items()}
    g = read_safetensors(os.path.join(d, "golden_logits.safetensors"))
    ids, ref = g["input_ids"], g["logits"]

    plain = np.stack([forward(w, cfg, row, None) for row in ids])
    err = np.abs(plain - ref).max()
    print(f"no window vs transformers: max |dlogit| = {err:.2e}")
    assert err < 1e-4, "the reference does not reproduce transformers' logits"

    windowed = np.stack([forward(w, cfg, row, WINDOW) for row in ids])
    t = ids.shape[1]
    same = np.abs(windowed[:, :WINDOW] - plain[:, :WINDOW]).max()
    moved = np.abs(windowed[:, WINDOW:] - plain[:, WINDOW:]).max()
    print(f"window {WINDOW}: positions < {WINDOW} change by {same:.2e}, later ones by up to {moved:.2e}")
    assert same < 1e-9 and moved > 1e-2

    out = os.path.join(root, "tests", "fixtures", "tiny_mistral_window16.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_safetensors(
        out,
        {
            "input_ids": ids.astype(np.int64),
            "logits": windowed[:, KEEP_FROM:t].astype(np.float32),
        },
        {
            "sliding_window": str(WINDOW),
            "first_position": str(KEEP_FROM),
            "source": "scripts/sliding_window_ref.py on golden tiny/tiny-mistral",
        },
    )
    print(f"wrote {out}: logits of positions {KEEP_FROM}..{t} of both rows")


if __name__ == "__main__":
    main()
