"""TensorRT 10 backend (thin): engines built from the exported ONNX graphs, run on torch CUDA buffers.

- One engine per graph and batch size, static shapes (an optimisation profile with min = opt = max),
  the UNet in fp16, the VQGAN encoder/decoder in fp32 (the decoder's codebook argmin is precision
  sensitive and both are a small share of the time).
- Plans are cached on disk keyed by GPU model, TensorRT version, weights hash, graph and batch, so a
  worker builds once per node and model.
- Inputs and outputs are torch-allocated CUDA tensors handed over with `set_tensor_address`; every
  graph runs with `execute_async_v3` on torch's current stream, and the whole 15-step loop is captured
  in one CUDA graph per batch size where capture works (else it runs step by step).

TensorRT is not installable in CI; this module imports it lazily and raises EngineUnavailable without it.
Operators check it on their node with `cinesr selftest --backend tensorrt` (parity vs onnxruntime).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from cinesr.model.folders import atomic_write
from cinesr.worker.inference.engines.base import Engine, EngineUnavailable, LoadedModel, StepCallback
from cinesr.worker.inference.graphs import ensure_onnx

log = logging.getLogger(__name__)

_FP16_GRAPHS = {"unet", "student"}


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailable(f"tensorrt: not installed ({exc})") from exc
    return trt


def plan_cache_dir() -> Path:
    root = os.environ.get("CINESR_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "cinesr-cache")
    return Path(root) / "tensorrt"


def plan_key(gpu_name: str, trt_version: str, weights_hash: str, graph: str, batch: int, fp16: bool) -> str:
    """File name of a cached plan: everything a plan depends on is in it."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    digest = hashlib.sha256(f"{weights_hash}|{graph}|{batch}|{fp16}".encode()).hexdigest()[:16]
    return f"{gpu}_trt{trt_version}_{graph}_b{batch}_{'fp16' if fp16 else 'fp32'}_{digest}.plan"


class _Graph:
    """One deserialised TensorRT engine with its execution context (static shapes)."""

    def __init__(self, trt: Any, runtime: Any, plan: bytes) -> None:
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineUnavailable("tensorrt: could not deserialise a cached plan")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.output_shape = tuple(self.engine.get_tensor_shape(self.outputs[0]))

    def run(self, stream: torch.cuda.Stream, out: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        for name, value in inputs.items():
            self.context.set_tensor_address(name, value.data_ptr())
        self.context.set_tensor_address(self.outputs[0], out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("tensorrt: execute_async_v3 failed")
        return out


class TensorRTEngine(Engine):
    """batch_sizes: the static batch sizes engines are built for (a batch is padded up to the next)."""

    name = "tensorrt"

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cuda",
        batch_sizes: tuple[int, ...] = (1, 4, 8),
        onnx_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        cuda_graphs: bool = True,
        workspace_gib: float = 4.0,
    ) -> None:
        trt = _import_trt()
        if not torch.cuda.is_available():
            raise EngineUnavailable("tensorrt: no CUDA device")
        device = torch.device(device)
        if device.type != "cuda":
            raise EngineUnavailable("tensorrt: runs on CUDA only")
        super().__init__(model, device)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.onnx_dir = ensure_onnx(model, onnx_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else plan_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.gpu = torch.cuda.get_device_name(device)
        self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        self.workspace = int(workspace_gib * (1 << 30))
        self.cuda_graphs = cuda_graphs
        self.stream = torch.cuda.Stream(device)
        self._graphs: dict[tuple[str, int], _Graph] = {}
        self._loops: dict[int, Any] = {}
        self.graph(self.batch_sizes[0], "unet")  # fail early (and build/cache) if TensorRT cannot run it

    # -- building and caching ------------------------------------------------------------------
    def _build_plan(self, graph: str, batch: int, fp16: bool) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.onnx_dir / f"{graph}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineUnavailable(f"tensorrt: cannot parse {graph}.onnx: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = (batch, *tuple(tensor.shape)[1:])
            profile.set_shape(tensor.name, shape, shape, shape)  # static: min = opt = max
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineUnavailable(f"tensorrt: building the {graph} engine failed")
        return bytes(plan)

    def graph(self, batch: int, name: str) -> _Graph:
        key = (name, batch)
        if key not in self._graphs:
            fp16 = name in _FP16_GRAPHS
            path = self.cache_dir / plan_key(self.gpu, self.trt.__version__, self.model.weights_hash, name, batch, fp16)
            if path.is_file():
                plan = path.read_bytes()
            else:
                log.info("tensorrt: building %s (batch %d, %s) -> %s", name, batch, "fp16" if fp16 else "fp32", path)
                plan = self._build_plan(name, batch, fp16)
                with atomic_write(path) as tmp:
                    tmp.write_bytes(plan)
            g = _Graph(self.trt, self.runtime, plan)
            for n in g.inputs:
                shape = (batch, *tuple(g.engine.get_tensor_shape(n))[1:])
                g.context.set_input_shape(n, shape)
            self._graphs[key] = g
        return self._graphs[key]

    def _padded(self, batch: int) -> int:
        for b in self.batch_sizes:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest built batch size {self.batch_sizes[-1]}")

    def _call(self, name: str, out_shape: tuple[int, ...], **inputs: torch.Tensor) -> torch.Tensor:
        batch = next(iter(inputs.values())).shape[0]
        pb = self._padded(batch)
        padded = {}
        for k, v in inputs.items():
            v = v.to(self.device).contiguous()
            if pb != batch:
                v = torch.cat([v, v[:1].expand(pb - batch, *v.shape[1:])])
            padded[k] = v.contiguous()
        out = torch.empty((pb, *out_shape[1:]), dtype=torch.float32, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.graph(pb, name).run(self.stream, out, **padded)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out[:batch]

    # -- the interface ---------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return self._call("encoder", (images.shape[0], g.latent_channels, g.latent_size, g.latent_size),
                          images=images.float())

    def denoise(self, x_scaled: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self._call(self.network, tuple(x_scaled.shape), x=x_scaled.float(), t=t.long(), lq=lq.float())

    @property
    def network(self) -> str:
        """The UNet graph of the current plan: the student for the step counts it serves."""
        return "student" if self.runs_student else "unet"

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return self._call("decoder", (latents.shape[0], g.channels, g.image_size, g.image_size),
                          latents=latents.float())

    def sample(
        self, y: torch.Tensor, lq: torch.Tensor, noise: torch.Tensor, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        batch = y.shape[0]
        if not self.cuda_graphs or batch not in self.batch_sizes:
            return super().sample(y, lq, noise, on_step)
        loop = self._loops.get(batch)
        if loop is None:
            try:
                loop = _TrtLoop(self, batch)
            except Exception as exc:  # capture is an optimisation: fall back to step-by-step
                log.warning("tensorrt: CUDA-graph capture failed (%s); running steps one by one", exc)
                self.cuda_graphs = False
                return super().sample(y, lq, noise, on_step)
            self._loops[batch] = loop
        out = loop.run(y.to(self.device), lq.to(self.device), noise.to(self.device))
        if on_step is not None:
            for k in range(self.plan.steps):
                on_step(k + 1, self.plan.steps)
        return out

    def _plan_changed(self) -> None:
        self._loops.clear()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensorrt": self.trt.__version__, "gpu": self.gpu,
                "batch_sizes": list(self.batch_sizes), "cuda_graphs": self.cuda_graphs,
                "precision": "fp16 unet, fp32 vqgan", "cache_dir": str(self.cache_dir)}


class _TrtLoop:
    """The 15-step loop on static buffers, captured as one CUDA graph (TensorRT enqueues + torch ops)."""

    def __init__(self, engine: TensorRTEngine, batch: int) -> None:
        g, dev, p = engine.geometry, engine.device, engine.plan
        lat = (batch, g.latent_channels, g.latent_size, g.latent_size)
        self.y = torch.zeros(lat, device=dev)
        self.lq = torch.zeros(batch, g.channels, g.lq_size, g.lq_size, device=dev)
        self.noise = torch.zeros((p.steps, *lat), device=dev)
        self.x = torch.zeros(lat, device=dev)
        self.xs = torch.zeros(lat, device=dev)
        self.x0 = torch.zeros(lat, device=dev)
        steps = [torch.full((batch,), t, dtype=torch.long, device=dev) for t in p.timesteps]
        unet = engine.graph(batch, engine.network)
        stream = torch.cuda.Stream(dev)

        def loop() -> None:
            self.x.copy_(self.y + p.start_scale * self.noise[0])
            for k in range(p.steps):
                torch.mul(self.x, p.c_in[k], out=self.xs)
                unet.run(stream, self.x0, x=self.xs, t=steps[k], lq=self.lq)
                self.x.mul_(p.a[k]).add_(self.x0, alpha=p.b[k])
                if p.c[k] != 0:
                    self.x.add_(self.y, alpha=p.c[k])
                if p.sigma[k] > 0:
                    self.x.add_(self.noise[k + 1], alpha=p.sigma[k])

        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            loop()  # warm-up run outside capture (TensorRT lazy initialisation)
        stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            loop()

    def run(self, y: torch.Tensor, lq: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.y.copy_(y)
        self.lq.copy_(lq)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.x.clone()
