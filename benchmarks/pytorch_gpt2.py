"""PyTorch GPT-2 baseline for the whole-step comparison: nanoGPT-style model, bf16 autocast,
torch.compile, flash attention (scaled_dot_product_attention), fused AdamW. Timed on the same
card and shape as nanollm's training run, in the same job.

    python benchmarks/pytorch_gpt2.py -e d12 -b 64 -t 1024 -d 65536 -x 30
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTHS = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, L, C, NH, Vp=50304, maxT=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(Vp, C), nn.Embedding(maxT, C)
        self.blocks = nn.ModuleList(Block(C, NH) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied lm head
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-e", default="d12")
    ap.add_argument("-b", type=int, default=64)
    ap.add_argument("-t", type=int, default=1024)
    ap.add_argument("-d", type=int, default=65536)
    ap.add_argument("-x", type=int, default=30, help="steps (the first few are warm-up)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    L = int(args.e[1:])
    C, NH = WIDTHS[L]
    B, T = args.b, args.t
    accum = args.d // (B * T)
    torch.manual_seed(42)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = GPT(L, C, NH).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    step_fn = model if args.no_compile else torch.compile(model)
    data = torch.randint(0, 50257, (accum, B, T + 1), device="cuda")
    flops_per_step = (6 * n_params + 6 * L * C * T) * B * T * accum  # llm.c's estimate (wpe counted, as llm.c)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.x):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_fn(data[micro, :, :-1], data[micro, :, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step < 3 or step % 10 == 0:
            print(f"step {step:4d} | loss {loss.item() * accum:.4f} | {times[-1] * 1e3:.1f} ms")
    steady = sorted(times[5:])[len(times[5:]) // 2] if len(times) > 5 else times[-1]
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    tflops = flops_per_step / steady / 1e12
    print(f"\nPyTorch {torch.__version__} {'eager' if args.no_compile else 'torch.compile'} + SDPA flash, "
          f"{torch.cuda.get_device_name()}: {args.e} B={B} T={T} tokens/step={B * T * accum}")
    print(f"median ms/step {steady * 1e3:.1f} | tokens/s {B * T * accum / steady:,.0f} | "
          f"{tflops:.0f} TFLOP/s ({100 * tflops / 989.4:.1f}% of 989 TF) | peak memory {peak_gb:.1f} GB")


if __name__ == "__main__":
    main()
