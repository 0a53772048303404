"""A NumPy forward pass over the weights exactly as a .qora file stores them.

With `quantize_activations`, every product with a Q4/Q8 matrix first rounds its
input to Q8 blocks the way the engine does, so the engine must match this
reference to float rounding even for quantized models (transformers can only
bound those loosely, since quantization itself changes the function)."""

import numpy as np

from qora.engine import rope_parameters


def q8_round(x):
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return (np.rint(xb * inv[:, None]) * d[:, None]).reshape(-1)


class ReferenceModel:
    def __init__(self, qfile, quantize_activations=True):
        self.cfg = qfile.config
        self.w = {name: qfile.dequantize(name).astype(np.float64) for name in qfile.tensor_info}
        self.dtypes = {name: info["dtype"] for name, info in qfile.tensor_info.items()}
        self.qa = quantize_activations
        self.inv_freq, self.rope_scale = rope_parameters(self.cfg)

    def mm(self, name, x):
        if self.qa and self.dtypes[name] in ("q4", "q8"):
            x = q8_round(x.astype(np.float32))
        return self.w[name] @ x

    def rms(self, x, w):
        return w * (x / np.sqrt(np.mean(x * x) + self.cfg["norm_eps"]))

    def rope(self, v, pos, n):
        hd = self.cfg["head_dim"]
        v = v.reshape(n, hd)
        ang = (np.float32(pos) * self.inv_freq).astype(np.float64)
        c, s = np.cos(ang) * self.rope_scale, np.sin(ang) * self.rope_scale
        h = hd // 2
        return np.concatenate([v[:, :h] * c - v[:, h:] * s, v[:, h:] * c + v[:, :h] * s], axis=1).reshape(-1)

    def forward(self, tokens):
        c = self.cfg
        nh, nkv, hd = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        kcache = [[] for _ in range(c["n_layers"])]
        vcache = [[] for _ in range(c["n_layers"])]
        out = []
        for pos, tok in enumerate(tokens):
            x = self.w["tok_embeddings"][tok].copy()
            for i in range(c["n_layers"]):
                p = f"layers.{i}."
                xb = self.rms(x, self.w[p + "attn_norm"])
                q, k, v = self.mm(p + "wq", xb), self.mm(p + "wk", xb), self.mm(p + "wv", xb)
                if c["rope_layers"][i]:
                    q, k = self.rope(q, pos, nh), self.rope(k, pos, nkv)
                kcache[i].append(k)
                vcache[i].append(v)
                K, V = np.stack(kcache[i]), np.stack(vcache[i])
                att = np.zeros(nh * hd)
                for h in range(nh):
                    g = h // (nh // nkv)
                    s = K[:, g * hd : (g + 1) * hd] @ q[h * hd : (h + 1) * hd] / np.sqrt(hd)
                    pr = np.exp(s - s.max())
                    att[h * hd : (h + 1) * hd] = (pr / pr.sum()) @ V[:, g * hd : (g + 1) * hd]
                x = x + self.mm(p + "wo", att)
                xb = self.rms(x, self.w[p + "ffn_norm"])
                g, u = self.mm(p + "w_gate", xb), self.mm(p + "w_up", xb)
                x = x + self.mm(p + "w_down", g / (1 + np.exp(-g)) * u)
            head = "output" if "output" in self.w else "tok_embeddings"
            out.append(self.mm(head, self.rms(x, self.w["norm"])))
        return np.stack(out)
