"""PyTorch training steps as the peers of the demos and benchmarks (torch is imported by the
caller; never a runtime dependency).

Modes (what a PyTorch user gets in each case, eager):
  fp32     float32 with TF32 off (cudnn.allow_tf32 = matmul.allow_tf32 = False): the same math
           as pymetalnn's float32 path
  default  PyTorch's defaults untouched: convolutions may use TF32 tensor cores
           (cudnn.allow_tf32 defaults to True), matmuls do not (matmul.allow_tf32 False)
  amp      torch.autocast(float16) + torch.amp.GradScaler, channels_last memory format (cuda only)
cudnn.benchmark is on in every mode.
"""
from __future__ import annotations

from typing import Any, Callable

MODES = ("fp32", "default", "amp")


def configure(torch: Any, mode: str) -> None:
    """Set torch's global math switches for `mode` (see the module's note)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    torch.backends.cudnn.benchmark = True
    if mode == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    else:  # PyTorch's defaults
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False


def train_step(torch: Any, mode: str, model: Any, forward: Callable[[Any], Any], opt: Any,
               x: Any, y: Any) -> tuple[Callable[[], Any], Any]:
    """(step, x as the step reads it): step() runs forward, cross-entropy, backward and the
    optimizer step in `mode` and returns the loss tensor (no host sync). amp: the model and x in
    channels_last, the loss scaled by a GradScaler (init 2^16, torch's defaults)."""
    configure(torch, mode)
    ce = torch.nn.functional.cross_entropy
    if mode != "amp":
        def step() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = ce(forward(x), y)
            loss.backward()
            opt.step()
            return loss

        return step, x
    if x.device.type != "cuda":
        raise ValueError("mode 'amp': float16 autocast needs a cuda device")
    model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    scaler = torch.amp.GradScaler("cuda")

    def amp_step() -> Any:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = ce(forward(xc), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return amp_step, xc
