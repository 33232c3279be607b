"""`TensorData`, the client's 1-D tensor, and `to_array`, which reads every tensor a user may
give (lists, numpy arrays, torch tensors, TensorData) as a numpy array of a wire dtype.

Torch tensors are duck-typed (anything with `.detach().cpu().numpy()`); torch itself is only
imported by `TensorData.to_torch`. Lists take each field's canonical dtype (int64 token ids,
float32 values); arrays and tensors keep their dtype where the wire has it (int64, int32,
float32, float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import numpy as np

from cispo.v1.tensors import DTYPE_CODES, NumberKind

__all__ = ["TensorData", "TensorDtype", "to_array"]

TensorDtype = Literal["int64", "int32", "float32", "float64"]
"""Element types a tensor can have on the wire."""

# numpy dtype of each wire dtype (native byte order; the wire is little-endian).
_NP_DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPE_CODES}


def _is_torch_like(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("detach", "cpu", "numpy"))


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor (duck-typed) as a numpy array, on the CPU, without grad."""
    tensor = tensor.detach().cpu()
    for name in ("resolve_conj", "resolve_neg"):  # numpy() refuses lazily negated views
        if hasattr(tensor, name):
            tensor = getattr(tensor, name)()
    try:
        return tensor.numpy()
    except TypeError:
        # numpy has no bfloat16 (nor float8): widen floating tensors to float32.
        if hasattr(tensor, "is_floating_point") and tensor.is_floating_point():
            return tensor.float().numpy()
        raise


def to_array(value: Any, *, kind: NumberKind | None = None, what: str = "tensor") -> np.ndarray:
    """`value` as a 1-D numpy array of a wire dtype; no copy when it already is one.

    kind: "int" for token ids (integer dtypes only; int32 stays int32, others become int64),
          "float" for values (integers and bools become float32), None to keep the dtype
          (lists of floats become float32).
    what: the name used in error messages, e.g. "data[2].loss_fn_inputs.advantages".
    Raises ValueError for non-1-D or non-numeric data, TypeError for unsupported objects.
    """
    typed = True  # the input states its dtype; a Python list does not
    if isinstance(value, TensorData):
        array = value.to_numpy()
    elif isinstance(value, np.ndarray):
        array = value
    elif _is_torch_like(value):
        array = _torch_to_numpy(value)
    elif callable(getattr(value, "to_numpy", None)):  # another package's TensorData (the tinker SDK's)
        array = np.asarray(value.to_numpy())
    elif isinstance(value, (list, tuple, range)):
        typed = False
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{what}: expected a flat sequence of numbers ({exc})") from None
    elif hasattr(value, "__array__"):
        array = np.asarray(value)
    else:
        raise TypeError(f"{what}: expected a list, numpy array, torch tensor or TensorData, got {type(value).__name__}")
    if array.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D tensor, got shape {tuple(array.shape)}")

    dtype_kind = array.dtype.kind
    if dtype_kind in "iu":
        if kind == "float":
            target = _NP_DTYPES["float32"]
        elif array.dtype.itemsize == 4 and dtype_kind == "i" and typed:
            target = _NP_DTYPES["int32"]
        else:
            target = _NP_DTYPES["int64"]
    elif kind == "int" and dtype_kind in "fb":
        if array.size:
            raise ValueError(f"{what}: expected integer token ids, got dtype {array.dtype}")
        target = _NP_DTYPES["int64"]  # an empty list; the server judges the length
    elif dtype_kind == "f":
        if not typed or array.dtype.itemsize < 8:
            target = _NP_DTYPES["float32"]  # lists, float16
        else:
            target = _NP_DTYPES["float64"]  # float64 (and longdouble) given explicitly
    elif dtype_kind == "b" and kind == "float":
        target = _NP_DTYPES["float32"]
    else:
        raise ValueError(f"{what}: expected numeric data, got dtype {array.dtype}")
    return array.astype(target, copy=False)


class TensorData:
    """A 1-D tensor of int64, int32, float32 or float64 elements, held as a numpy array.

    Tinker-compatible: `TensorData(data=[...], dtype="float32", shape=[n])`,
    `TensorData.from_numpy(a)`, `TensorData.from_torch(t)`, `.to_numpy()`, `.to_torch()`,
    `.tolist()`, `.data`, `.dtype`, `.shape`.
    """

    __slots__ = ("_array",)

    def __init__(
        self,
        data: Any,
        dtype: TensorDtype | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        """data: a 1-D list/array/tensor; dtype: convert to this wire dtype (default: keep,
        lists of floats become float32); shape: optional, must be [len(data)]."""
        array = to_array(data, what="TensorData")
        if dtype is not None:
            if dtype not in _NP_DTYPES:
                raise ValueError(f"TensorData: dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
            array = array.astype(_NP_DTYPES[dtype], copy=False)
        if shape is not None and list(shape) != [array.shape[0]]:
            raise ValueError(f"TensorData: shape {list(shape)} does not match {array.shape[0]} elements")
        self._array: np.ndarray = array

    @classmethod
    def _wrap(cls, array: np.ndarray) -> TensorData:
        """Wrap an array already 1-D and of a wire dtype (no checks, no copy)."""
        tensor = cls.__new__(cls)
        tensor._array = array
        return tensor

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """From a 1-D numpy array; int32/int64/float32/float64 are kept without a copy,
        other integers become int64 and float16 becomes float32."""
        return cls._wrap(to_array(array, what="TensorData"))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """From a 1-D torch tensor (moved to the CPU; bfloat16 becomes float32)."""
        return cls._wrap(to_array(tensor, what="TensorData"))

    def to_numpy(self) -> np.ndarray:
        """The elements, shape (N,): the array itself, not a copy."""
        return self._array

    def to_torch(self) -> Any:
        """The elements as a torch tensor, shape (N,) (imports torch)."""
        import torch  # only here: the client does not depend on torch

        return torch.from_numpy(np.array(self._array, copy=True))

    def tolist(self) -> list:
        """The elements as a list of Python ints or floats."""
        return self._array.tolist()

    @property
    def data(self) -> list:
        """The elements as a list (Tinker's field); prefer `to_numpy()`."""
        return self._array.tolist()

    @property
    def dtype(self) -> TensorDtype:
        """The element type: "int64", "int32", "float32" or "float64"."""
        return cast(TensorDtype, self._array.dtype.name)  # always a wire dtype's name

    @property
    def shape(self) -> list[int]:
        """[N]."""
        return [int(self._array.shape[0])]

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorData):
            return NotImplemented
        return self.dtype == other.dtype and np.array_equal(
            self._array, other._array, equal_nan=self._array.dtype.kind == "f"
        )

    __hash__ = None  # type: ignore[assignment]  # unhashable, as a mutable value (like list): object types it as a method

    def __repr__(self) -> str:
        values = np.array2string(self._array, separator=", ", threshold=8)
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape}, data={values})"
