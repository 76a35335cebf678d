"""The few CUDA driver calls the IPC links need, through ctypes on libcuda (present wherever a GPU driver is):
device memory outside torch's caching allocator (so an IPC handle names exactly one buffer), IPC handles, and a
stream memory operation that writes a word from a stream of its own (to release waits after a peer died)."""
from __future__ import annotations

import ctypes

import torch

CU_STREAM_NON_BLOCKING = 0x1
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1


class CudaDriverError(RuntimeError):
    pass


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # not c_char: ctypes would cut its bytes at the first NUL


_lib: ctypes.CDLL | None = None


def _fn(name: str):
    """A driver entry point, by its versioned name where the header maps it to one."""
    global _lib
    if _lib is None:
        try:
            _lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaDriverError(f"the CUDA driver library is not loadable: {exc}") from None
    for candidate in (f"{name}_v2", name):
        if hasattr(_lib, candidate):
            return getattr(_lib, candidate)
    raise CudaDriverError(f"the CUDA driver has no {name}")


def _call(name: str, *args) -> None:
    result = _fn(name)(*args)
    if result != 0:
        text = ctypes.c_char_p()
        _lib.cuGetErrorName(result, ctypes.byref(text))
        raise CudaDriverError(f"{name} failed: {text.value.decode() if text.value else result}")


def mem_alloc(nbytes: int) -> int:
    ptr = ctypes.c_uint64()
    _call("cuMemAlloc", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
    return ptr.value


def mem_free(ptr: int) -> None:
    _call("cuMemFree", ctypes.c_uint64(ptr))


def ipc_handle(ptr: int) -> bytes:
    handle = IpcHandle()
    _call("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(ptr))
    return bytes(handle.reserved)


def ipc_open(handle: bytes) -> int:
    ptr = ctypes.c_uint64()
    _call("cuIpcOpenMemHandle", ctypes.byref(ptr), IpcHandle((ctypes.c_ubyte * 64).from_buffer_copy(handle)),
          ctypes.c_uint(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS))
    return ptr.value


def ipc_close(ptr: int) -> None:
    _call("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))


def memcpy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Copies nbytes between device addresses (of this GPU, or another's mapped here) on `stream`, in its order;
    captured into a CUDA graph like any stream work."""
    _call("cuMemcpyAsync", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes),
          ctypes.c_void_p(stream))


class DevicePointer:
    """A device address as Triton takes pointer arguments (data_ptr and dtype). Memory of another GPU, mapped here
    by IPC, cannot be a tensor of this process's device: torch, seeing where it lies, would copy it."""

    def __init__(self, ptr: int, dtype: torch.dtype) -> None:
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


def stream_write_value(stream: int, address: int, value: int) -> None:
    """Writes the uint64 `value` at `address` once `stream`'s prior work is done (with a memory fence before)."""
    _call("cuStreamWriteValue64", ctypes.c_void_p(stream), ctypes.c_uint64(address), ctypes.c_uint64(value),
          ctypes.c_uint(0))


def stream_create_non_blocking() -> int:
    stream = ctypes.c_void_p()
    _call("cuStreamCreate", ctypes.byref(stream), ctypes.c_uint(CU_STREAM_NON_BLOCKING))
    return stream.value or 0


class _ArrayInterface:
    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def tensor_at(ptr: int, nbytes: int, device: str | torch.device) -> torch.Tensor:
    """A uint8 tensor over device memory torch did not allocate (it does not own or free it), which must lie on
    `device`: torch would silently copy memory of another GPU rather than wrap it."""
    tensor = torch.as_tensor(_ArrayInterface(ptr, nbytes))
    want = torch.device(device)
    if tensor.device.type != want.type or (want.index is not None and tensor.device.index != want.index):
        raise CudaDriverError(f"device memory at {ptr:#x} lies on {tensor.device}, not {want}: allocate it with "
                              f"{want} current")
    return tensor
