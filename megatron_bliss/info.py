"""Environment report: versions, devices, the compiled extension, and which kernels a run would use.

``python -m megatron_bliss.info`` prints it (``--json`` for a machine-readable dict); :func:`collect_info` returns it.
Each probe catches its own failure, so the report comes out on any machine: a missing or broken package shows as
``not installed (<reason>)`` rather than a traceback. megatron-core's import-time warnings (no Transformer Engine or
apex) are silenced here because the report states the same facts.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import warnings
from typing import Any

import torch

import megatron_bliss
from megatron_bliss.ops import _ext
from megatron_bliss.ops.lm_loss import fused_loss_path
from megatron_bliss.ops.multi_tensor import ops_path


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> tuple[Any, str | None]:
    """(module, None) when ``module`` imports quietly, else (None, reason); never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module), None
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return None, _short_error(exc)


def _import_status(module: str, distribution: str) -> str:
    """``"<version>"`` when ``module`` imports, else ``"not installed (<reason>)"``."""
    mod, error = _try_import(module)
    if mod is None:
        return f"not installed ({error})"
    version = getattr(mod, "__version__", None) or _distribution_version(distribution)
    return str(version) if version else "installed (version unknown)"


def _megatron_core() -> str:
    version = _distribution_version("megatron-core")
    mod, error = _try_import("megatron.core")
    if mod is None:
        return f"not installed ({error})" if version is None else f"{version} (import failed: {error})"
    return version or "installed (version unknown)"


def _devices() -> tuple[int, list[str]]:
    try:
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            return count, [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count)]
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the report
        return 0, [f"cpu (CUDA probe failed: {_short_error(exc)})"]
    return 0, ["cpu"]


def _sdpa_kernel_works(backend_name: str) -> bool:
    """Runs a tiny fp16 scaled_dot_product_attention restricted to one backend on cuda:0."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16)
        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except Exception:  # noqa: BLE001 - unsupported GPU, kernel not compiled in, old torch
        return False


def _attention(cuda: bool) -> dict[str, Any]:
    """What ``model.attention_backend=auto`` resolves to here, and which SDPA kernels this GPU runs."""
    flash = cuda and _sdpa_kernel_works("FLASH_ATTENTION")
    mem_efficient = cuda and _sdpa_kernel_works("EFFICIENT_ATTENTION")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron_bliss.models.gpt import resolve_attention_backend
        backend = resolve_attention_backend("auto")
    except Exception:  # noqa: BLE001 - models/ absent or megatron-core broken: same rule, stated here
        backend = ("te" if _try_import("transformer_engine.pytorch")[0] is not None else "sdpa") if cuda else "local"
    described = {
        "te": "Transformer Engine fused attention (te layer spec)",
        "sdpa": "torch SDPA (" + ("flash" if flash else "memory-efficient" if mem_efficient else "math") + " kernel)",
        "local": "local (unfused) attention",
    }.get(backend, backend)
    return {"attention_backend": described, "sdpa_flash": flash, "sdpa_mem_efficient": mem_efficient}


def _ops_paths(cuda: bool, path=ops_path) -> str:
    paths = [f"cpu: {path('cpu')}"]
    if cuda:
        paths.append(f"cuda: {path('cuda')}")
    return ", ".join(paths)


def _nccl() -> dict[str, Any]:
    out: dict[str, Any] = {"nccl_available": False, "nccl_version": None, "gloo_available": False}
    try:
        import torch.distributed as dist

        out["gloo_available"] = dist.is_available() and dist.is_gloo_available()
        out["nccl_available"] = dist.is_available() and dist.is_nccl_available()
        if out["nccl_available"] and torch.cuda.is_available():
            version = torch.cuda.nccl.version()
            out["nccl_version"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception as exc:  # noqa: BLE001
        out["nccl_version"] = f"probe failed ({_short_error(exc)})"
    return out


def collect_info() -> dict[str, Any]:
    """Returns the environment report as a flat dict of JSON-serializable values (keys as printed by ``main``)."""
    cuda_count, devices = _devices()
    cuda = cuda_count > 0
    info: dict[str, Any] = {
        "megatron_bliss": megatron_bliss.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "megatron_core": _megatron_core(),
        "cuda_device_count": cuda_count,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "ext_built": importlib.util.find_spec("megatron_bliss._C") is not None,
        "ext_loaded": _ext.ext_available(),
        "ext_cuda": _ext.ext_has_cuda(),
        "ext_error": _ext.ext_error(),
        "ops_path": _ops_paths(cuda),
        "bilevel_loss_path": _ops_paths(cuda, fused_loss_path),
    }
    info.update(_attention(cuda))
    info["transformer_engine"] = _import_status("transformer_engine.pytorch", "transformer-engine")
    info["apex"] = _import_status("apex", "apex")  # the distribution's version; apex has no __version__
    info.update(_nccl())
    return info


def format_info(info: dict[str, Any]) -> str:
    """One ``key: value`` line per entry, keys aligned."""
    width = max(map(len, info))
    lines = []
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_bliss.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    info = collect_info()
    sys.stdout.write(json.dumps(info, indent=1) + "\n" if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
