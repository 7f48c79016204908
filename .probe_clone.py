import time, torch
x = torch.randn(151936).pin_memory()
y = torch.randn(151936)
def t(f, n=200):
    f(); s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
print(f"clone pinned {t(lambda: x.clone()):.1f} us, clone pageable {t(lambda: y.clone()):.1f} us, "
      f"empty+copy_ from pinned {t(lambda: torch.empty(x.shape).copy_(x)):.1f} us, is_pinned(clone) {x.clone().is_pinned()}")
