"""PyTorch backend: eager by default; optional torch.compile; fp16/bf16 and a CUDA-graph loop on GPU."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from cinesr.worker.inference.engines.base import Engine, EngineUnavailable, LoadedModel, StepCallback

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchEngine(Engine):
    """Runs the networks directly. precision: fp32 | fp16 | bf16 (half precisions on CUDA only: CPU
    half kernels are slower than fp32). cuda_graphs: capture the whole 15-step loop once per batch
    size and replay it (CUDA only; removes the per-kernel launch cost that dominates small models)."""

    name = "torch"

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        cuda_graphs: bool = False,
        threads: int | None = None,
    ) -> None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("torch: CUDA requested but torch.cuda.is_available() is False")
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}")
        if precision != "fp32" and device.type != "cuda":
            raise EngineUnavailable(f"torch: {precision} is only used on CUDA")
        super().__init__(model, device)
        self.precision = precision
        self.dtype = _DTYPES[precision]
        # copies for another device/precision, so the shared LoadedModel stays a CPU fp32 source
        own = device.type != "cpu" or precision != "fp32"

        def mine(net: torch.nn.Module) -> torch.nn.Module:
            return copy.deepcopy(net) if own else net

        # the teacher, and the distilled student for the step counts it serves (_plan_changed picks)
        self._unets = {"teacher": mine(model.unet).to(device, self.dtype).eval()}
        if model.student is not None:
            self._unets["student"] = mine(model.student).to(device, self.dtype).eval()
        # the VQGAN's codebook lookup (argmin) is precision-sensitive: keep it fp32, it is cheap
        self.vqgan = mine(model.vqgan).to(device).eval()
        self._encode = self.vqgan.encode
        self._decode = self.vqgan.decode
        self.compiled = bool(compile)
        self._calls = dict(self._unets)
        if compile:
            self._calls = {k: torch.compile(v, dynamic=False) for k, v in self._unets.items()}
            self._encode = torch.compile(self.vqgan.encode, dynamic=False)
            self._decode = torch.compile(self.vqgan.decode, dynamic=False)
        self._select()
        self.cuda_graphs = bool(cuda_graphs and device.type == "cuda")
        self._graphs: dict[int, _LoopGraph] = {}
        # CPU intra-op threads for this engine's calls (None: leave torch's process-wide setting)
        self.threads = threads

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        if self.threads is None or self.device.type != "cpu":
            yield
            return
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._threads():
            return self._encode(images.to(self.device, torch.float32))

    @torch.inference_mode()
    def denoise(self, x_scaled: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        with self._threads():
            x, lq = x_scaled.to(self.device, self.dtype), lq.to(self.device, self.dtype)
            return self._unet(x, t.to(self.device), lq=lq).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._threads():
            return self._decode(latents.to(self.device, torch.float32))

    @torch.inference_mode()
    def sample(
        self, y: torch.Tensor, lq: torch.Tensor, noise: torch.Tensor, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        if not self.cuda_graphs:
            return super().sample(y, lq, noise, on_step)
        batch = y.shape[0]
        graph = self._graphs.get(batch)
        if graph is None:
            graph = self._graphs[batch] = _LoopGraph(self, batch)
        out = graph.run(y, lq, noise)
        if on_step is not None:  # the loop ran as one replay; report its steps at once
            for k in range(self.plan.steps):
                on_step(k + 1, self.plan.steps)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": self.precision,
            "compile": self.compiled,
            "cuda_graphs": self.cuda_graphs,
            "threads": self.threads if self.threads is not None else torch.get_num_threads(),
            "torch": torch.__version__,
            "network": self.network,
        }

    def _select(self) -> None:
        """Run the student for the step counts it was distilled for, the teacher otherwise."""
        which = "student" if self.runs_student else "teacher"
        self.network = which
        self.unet, self._unet = self._unets[which], self._calls[which]

    def _plan_changed(self) -> None:
        self._graphs.clear()
        if hasattr(self, "_unets"):  # set_steps during __init__ runs before the networks exist
            self._select()

    def close(self) -> None:
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _LoopGraph:
    """The sampling loop for one batch size captured as one CUDA graph over static buffers."""

    def __init__(self, engine: TorchEngine, batch: int) -> None:
        g = engine.geometry
        dev = engine.device
        lat = (batch, g.latent_channels, g.latent_size, g.latent_size)
        self.y = torch.zeros(lat, device=dev)
        self.lq = torch.zeros(batch, g.channels, g.lq_size, g.lq_size, device=dev)
        self.noise = torch.zeros((engine.plan.steps, *lat), device=dev)
        self.steps = [torch.full((batch,), t, dtype=torch.long, device=dev) for t in engine.plan.timesteps]
        self.engine = engine

        def loop() -> torch.Tensor:
            p = engine.plan
            x = self.y + p.start_scale * self.noise[0]
            for k in range(p.steps):
                x0 = engine._unet(x.to(engine.dtype) * p.c_in[k], self.steps[k], lq=self.lq.to(engine.dtype))
                x = p.a[k] * x + p.b[k] * x0.float()
                if p.c[k] != 0:
                    x = x + p.c[k] * self.y
                if p.sigma[k] > 0:
                    x = x + p.sigma[k] * self.noise[k + 1]
            return x

        # warm up on a side stream (cuDNN/cuBLAS pick kernels, lazy inits run) before capturing
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                loop()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = loop()

    def run(self, y: torch.Tensor, lq: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.y.copy_(y)
        self.lq.copy_(lq)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()
