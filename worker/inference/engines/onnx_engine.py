"""onnxruntime backend: CPU execution provider (tested in CI) and CUDA with I/O binding.

On CUDA the inputs and outputs are torch CUDA tensors bound to the session by pointer, so the latents
stay on the GPU for the whole 15-step loop; nothing is copied to the host until the decoded window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cinesr.worker.inference.engines.base import Engine, EngineUnavailable, LoadedModel
from cinesr.worker.inference.graphs import ensure_onnx

_GRAPH_OUTPUTS = {"encoder": "latents", "unet": "x0", "decoder": "images", "student": "x0"}


def cpu_threads() -> int:
    """Cores this process may use (affinity-aware), for intra-op parallelism."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EngineUnavailable(f"onnx: onnxruntime is not installed ({exc})") from exc
    return ort


class OnnxEngine(Engine):
    """Sessions for encoder/unet/decoder from ONNX files (exported on first use when absent).

    threads: intra-op threads (default: all usable cores). The graphs are optimised at
    ORT_ENABLE_ALL (constant folding, GELU/LayerNorm/attention fusions, NCHWc conv layouts on CPU)."""

    name = "onnx"

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cpu",
        onnx_dir: str | Path | None = None,
        threads: int | None = None,
        optimization: str = "all",
        spin: bool = False,
    ) -> None:
        ort = _import_ort()
        device = torch.device(device)
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable("onnx: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            if not torch.cuda.is_available():
                raise EngineUnavailable("onnx: CUDA requested but no GPU is visible to torch")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                                    "CPUExecutionProvider"]
        elif device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise EngineUnavailable(f"onnx: unsupported device {device}")
        super().__init__(model, device)
        self.onnx_dir = ensure_onnx(model, onnx_dir)
        self.threads = int(threads or cpu_threads())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # no busy-waiting between ops: idle ORT threads spinning would steal the cores other work
        # (flow, the next slice, other workers, torch in a side-by-side benchmark) needs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.spin = spin
        self.optimization = optimization
        graphs = ["encoder", "unet", "decoder", *(["student"] if model.student is not None else [])]
        self.sessions = {
            g: ort.InferenceSession(str(self.onnx_dir / f"{g}.onnx"), sess_options=opts, providers=providers)
            for g in graphs
        }
        active = self.sessions["unet"].get_providers()
        if device.type == "cuda" and active[0] != "CUDAExecutionProvider":
            raise EngineUnavailable(f"onnx: CUDA provider failed to load (active: {active})")
        self._ort = ort

    # -- running one graph --------------------------------------------------------------------
    @property
    def network(self) -> str:
        """The UNet graph of the current plan: the student for the step counts it serves."""
        return "student" if self.runs_student else "unet"

    def _run(self, graph: str, **inputs: torch.Tensor) -> torch.Tensor:
        session = self.sessions[graph]
        if self.device.type == "cpu":
            feeds = {k: v.detach().cpu().contiguous().numpy() for k, v in inputs.items()}
            return torch.from_numpy(session.run([_GRAPH_OUTPUTS[graph]], feeds)[0])
        return self._run_bound(session, graph, inputs)

    def _run_bound(self, session: Any, graph: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """CUDA: bind torch buffers by address (inputs and a preallocated output); no host copies."""
        binding = session.io_binding()
        keep = []
        for name, value in inputs.items():
            v = value.to(self.device).contiguous()
            keep.append(v)
            elem = {torch.float32: 1, torch.int64: 7}[v.dtype]  # ONNX TensorProto element types
            binding.bind_input(name, "cuda", self.device.index or 0, _np_dtype(elem), list(v.shape), v.data_ptr())
        out_shape = self._output_shape(graph, inputs)
        out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        binding.bind_output(_GRAPH_OUTPUTS[graph], "cuda", self.device.index or 0, _np_dtype(1), out_shape,
                            out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch must be ready
        session.run_with_iobinding(binding)
        return out

    def _output_shape(self, graph: str, inputs: dict[str, torch.Tensor]) -> list[int]:
        g = self.geometry
        b = next(iter(inputs.values())).shape[0]
        if graph == "decoder":
            return [b, g.channels, g.image_size, g.image_size]
        return [b, g.latent_channels, g.latent_size, g.latent_size]

    # -- the interface ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run("encoder", images=images.float())

    def denoise(self, x_scaled: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self._run(self.network, x=x_scaled.float(), t=t.long(), lq=lq.float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", latents=latents.float())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "onnxruntime": self._ort.__version__,
            "providers": self.sessions["unet"].get_providers(),
            "threads": self.threads,
            "optimization": self.optimization,
            "spin": self.spin,
            "onnx_dir": str(self.onnx_dir),
        }

    def close(self) -> None:
        self.sessions.clear()


def _np_dtype(onnx_elem: int) -> Any:

    return {1: np.float32, 7: np.int64}[onnx_elem]
