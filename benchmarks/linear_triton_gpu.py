"""GPU comparison for issue 5: the Triton chunked causal linear-attention kernel against dense
causal SDPA (flash backend), bf16, N = 4K .. 128K, forward and forward+backward.

    python benchmarks/linear_triton_gpu.py [--lengths 4096,8192,16384,32768,65536,131072]
                                           [--batch 1] [--heads 16] [--dim 64] [--json out.json]

Needs CUDA and triton. Linear attention is ``linear_attention(elu(q)+1, elu(k)+1, v, causal=True)``
on the Triton backend (forward kernel; its backward recomputes through the PyTorch chunked
executor) and on the PyTorch chunked executor (``backend="torch"``) for reference. Times are
medians of ``triton.testing.do_bench`` in milliseconds; each length also checks the Triton output
against the PyTorch executor (relative error). Not run in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("linear_triton_gpu.py needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from attnzoo.kernels.linear import linear_attention

    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        shape = (args.batch, args.heads, n, args.dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def linear(backend):
            return lambda: linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal=True, backend=backend).to(v.dtype)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(), (q, k, v), grad)

        with torch.no_grad():
            err = float((linear("triton")().float() - linear("torch")().float()).norm() / linear("torch")().float().norm())
        row = {"n": n, "triton_vs_torch_rel_err": err}
        for label, fn in (("flash_sdpa", flash), ("triton", linear("triton")), ("torch_chunked", linear("torch"))):
            with torch.no_grad():
                row[f"{label}_fwd_ms"] = do_bench(fn, return_mode="median")
            row[f"{label}_fwd_bwd_ms"] = do_bench(fwd_bwd(fn), return_mode="median")
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    print(f"\nbf16, B={args.batch}, H={args.heads}, D={args.dim}, causal; {torch.cuda.get_device_name()}")
    print("| N | flash fwd | triton fwd | torch fwd | flash fwd+bwd | triton fwd+bwd | torch fwd+bwd | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['flash_sdpa_fwd_ms']:.2f} | {r['triton_fwd_ms']:.2f} | {r['torch_chunked_fwd_ms']:.2f} | "
              f"{r['flash_sdpa_fwd_bwd_ms']:.2f} | {r['triton_fwd_bwd_ms']:.2f} | {r['torch_chunked_fwd_bwd_ms']:.2f} | "
              f"{r['triton_vs_torch_rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
