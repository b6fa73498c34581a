"""Every CUDA sampling path once at small sizes, for compute-sanitizer (memcheck)."""

import torch

import decodekit  # noqa: F401  (loads the ops)

ops = torch.ops.decodekit
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for V, kind in ((3000, "randn"), (9000, "flat"), (700, "ties")):
        B = 12
        x = (
            (torch.randn(B, V) * (0.02 if kind == "flat" else 4))
            if kind != "ties"
            else torch.randint(0, 5, (B, V)).float()
        )
        x = x.to(dtype).cuda()
        T = torch.tensor([0.0, 0.7, 1.0, 1.5] * 3, device="cuda")
        k = torch.tensor([0, 1, 50, 600, 0, 2] * 2, device="cuda")
        p = torch.tensor([1.0, 0.9, 0.0, 0.95, 0.5, 1.0] * 2, device="cuda", dtype=torch.float64)
        m = torch.tensor([0.0, 0.1, 0.0] * 4, device="cuda")
        seed = torch.arange(B, device="cuda")
        ops.sample_from_logits(x, T, 0, k, 0, p, 1.0, m, 0.0, seed, 0, None, 3, V - 5, True, False, 0, False)
        for raw in (False, True):
            ops.sample_from_logits(x, T, 0, k, 0, p, 1.0, m, 0.0, seed, 0, None, 3, V - 5, True, True, 7, raw)
        ops.softmax(x, T, 0.0, V - 5, True)
        ops.argmax(x, V)
        ops.top_k_mask_logits(x, k, 0, V - 1)
        probs = torch.softmax(x.float(), -1)
        ops.filter_probs(probs, k, 0, p, 1.0, m, 0.0, V)
        ops.sample_from_probs(probs, k, 0, p, 1.0, m, 0.0, seed, 0, None, 0, V, True, True, 3, False)
torch.cuda.synchronize()
print("memcheck workload done")
