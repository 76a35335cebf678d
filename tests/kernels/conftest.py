"""Kernel tests run Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA);
this mends one incompatibility of the interpreter with the installed numpy before any kernel runs."""
import numpy as np
import pytest
import torch

try:
    from triton.runtime import interpreter
except ImportError:  # the tests skip themselves without triton
    interpreter = None


if interpreter is not None and hasattr(interpreter, "_patch_lang_tensor"):
    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_scalar_index(tensor, scope):
        """The interpreter holds a scalar as a 1-element array and turns it into an int (range bounds) with
        int(array), which numpy >= 2.4 refuses for arrays with a dimension: a loop over a runtime range, such as
        the key blocks of a sequence, would fail. Read the element instead."""
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor_scalar_index


@pytest.fixture
def round_to_nearest_even_in_the_interpreter(monkeypatch):
    """float32 -> bfloat16 casts of the interpreter round as the GPU's do, to nearest even (the interpreter truncates;
    unused when the kernels run compiled): then a kernel that rounds where its torch reference does gives its bits."""
    import triton.language as tl
    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_rounding_to_nearest_even(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_rounding_to_nearest_even)
