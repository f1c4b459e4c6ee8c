"""Inference engines behind one interface (encode, denoise step / sampling loop, decode).

    from cinesr.worker.inference.engines import create_engine
    engine = create_engine(backend="auto", device="auto", model=None)  # None: the bundled model
"""

from cinesr.worker.inference.engines.base import (
    Engine,
    EngineUnavailable,
    Geometry,
    LoadedModel,
    SamplerPlan,
    draw_noise,
    load_model,
)
from cinesr.worker.inference.engines.select import AUTO_ORDER, BACKENDS, DEVICES, candidates, create_engine

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "DEVICES",
    "Engine",
    "EngineUnavailable",
    "Geometry",
    "LoadedModel",
    "SamplerPlan",
    "candidates",
    "create_engine",
    "draw_noise",
    "load_model",
]
