"""What lives where, decided once from the artifact header and the machine.

This version places everything on the CPU: dense weights and routed experts are used in place from
the mapping. The GPU prefill engine plugs in here: the plan names the engine for each step and
which expert section it reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .artifact import Artifact
from .format import SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU, KrsError


@dataclass(frozen=True)
class Placement:
    prefill_device: str
    decode_device: str
    expert_section: str
    mapped_bytes: int  # bytes of the artifact the engines read through the mapping


def plan(artifact: Artifact, device: str = "cpu") -> Placement:
    if device not in ("cpu", "cuda", "auto"):
        raise KrsError(f"unknown device {device!r}: use cpu, cuda or auto")
    if device == "cuda":
        raise KrsError("GPU prefill is not available in this version: use --device cpu")
    if "cpu" not in artifact.header.get("sections", []):
        raise KrsError("artifact has no CPU expert blocks (compiled with --sections gpu): recompile with cpu")
    mapped = sum(c.length for c in artifact.chunks.values())
    return Placement("cpu", "cpu", SECTION_EXPERTS_CPU, mapped)


def place_weights(artifact: Artifact, placement: Placement) -> dict:
    """Artifact tensor name -> what the engines consume: views for matrices, float tensors for small vectors."""
    weights = {}
    expert_sections = {SECTION_EXPERTS_CPU, SECTION_EXPERTS_GPU} - {placement.expert_section}
    for name, spec in artifact.header["tensors"].items():
        if artifact.chunks[spec["chunk"]].section in expert_sections:
            continue  # the other expert layout is for the other engine; never touch its pages
        view = artifact.tensor(name)
        if view.experts:  # the engines address a layer's experts by layer, whichever layout holds them
            weights[f"layers.{artifact.chunks[spec['chunk']].layer}.experts"] = view
        elif view.codec == "f32":
            weights[name] = view.parts["w"]  # norms and biases, used as they are in the mapping
        elif name.endswith(".router"):
            weights[name] = view.parts["w"].float()  # routing decisions in float32, as in the reference
        else:
            weights[name] = view
    return weights


def set_threads(threads: int | None) -> int:
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    return threads


def physical_cores() -> int:
    try:
        cores = set()
        physical = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((physical, core))
        return max(1, len(cores))
    except OSError:
        return os.cpu_count() or 1
