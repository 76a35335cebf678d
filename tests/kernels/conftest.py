"""Kernel tests run Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA);
this mends one incompatibility of the interpreter with the installed numpy before any kernel runs."""
import numpy as np

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
