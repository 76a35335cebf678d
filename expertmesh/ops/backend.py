"""Which implementation of an op runs: its Triton kernel on CUDA, its torch reference elsewhere, or the one asked for;
and the one guarded import of triton, so that a CPU-only install still loads every op module."""
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path works; asking for the Triton one says what is missing
    from types import SimpleNamespace

    def _no_jit(fn=None, **_options):
        """triton.jit without triton, bare (@triton.jit) or with options (@triton.jit(do_not_specialize=...)): the
        kernel stays a plain function, never launched (pick_backend refuses the triton backend)."""
        return fn if fn is not None else (lambda kernel: kernel)

    triton = SimpleNamespace(jit=_no_jit)
    tl = SimpleNamespace(constexpr=None)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

BACKENDS = ("auto", "reference", "triton")


def pick_backend(device, backend: str, op: str) -> str:
    """"auto": "triton" on CUDA, "reference" elsewhere; op names the op in the errors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend of {op} must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "triton" and not HAVE_TRITON:
        raise ImportError(f"the triton backend of {op} needs the triton package, which is not installed")
    return backend
