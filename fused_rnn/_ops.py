"""Loads the compiled extension, which registers torch.ops.fused_rnn.layer_forward/_backward."""
import torch  # noqa: F401  (torch first: the extension finds libc10 through it)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "fused_rnn: the compiled extension fused_rnn._C could not be loaded "
        f"({exc}). Build it against the installed torch with "
        "`pip install --no-build-isolation -e .` (a build made for another torch version does not load)."
    ) from exc

built_with_cuda: bool = _C.built_with_cuda
