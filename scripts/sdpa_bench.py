"""PyTorch SDPA baselines on the same GPU as attn_bench: flash (FA2) and cuDNN backends,
causal, forward and forward+backward, printing ms and TFLOP/s with attn_bench's convention
(4*D flops per causal pair forward, 10*D forward+backward)."""
import json
import sys
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def bench(fn, iters):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    args = dict(a.split("=") for a in sys.argv[1:])
    b, h, s, d = (int(args.get(k, v)) for k, v in [("b", 1), ("h", 16), ("s", 4096), ("d", 128)])
    hkv = int(args.get("hkv", h))
    json_path = args.get("json")
    gpu = torch.cuda.get_device_name()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.get("dtype", "bf16")]
    iters = int(args.get("iters", 5))
    q = torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    gqa = dict(enable_gqa=True) if hkv != h else {}
    do = torch.randn_like(q)
    pairs = b * h * s * (s + 1) / 2
    for name, backend in [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa), iters)
                def fb():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
                    o.backward(do)
                fwdbwd = bench(fb, iters)
            print(f"{name} b={b} h={h} s={s} d={d} {args.get('dtype', 'bf16')}: fwd {fwd:.3f} ms "
                  f"({4 * d * pairs / fwd / 1e9:.1f} TFLOP/s), fwd+bwd {fwdbwd:.3f} ms "
                  f"({10 * d * pairs / fwdbwd / 1e9:.1f} TFLOP/s)", flush=True)
            if json_path:
                impl = {"sdpa-flash": "sdpa_flash", "sdpa-cudnn": "sdpa_cudnn", "sdpa-efficient": "sdpa_efficient"}[name]
                with open(json_path, "a") as f:
                    f.write(json.dumps(dict(impl=impl, method="dense", seq=s, batch=b, heads_q=h, heads_kv=hkv, head_dim=d,
                                            dtype=args.get("dtype", "bf16"), fwd_ms=round(fwd, 4), fwdbwd_ms=round(fwdbwd, 4),
                                            peak_mib=None, gpu=gpu, pairs=int(pairs))) + "\n")
        except Exception as e:  # a backend may not support the dtype
            print(f"{name}: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)


main()
