from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402

from krasis_compile.compile import compile_model  # noqa: E402

torch.set_num_threads(1)  # CI has 2 cores; tiny models gain nothing from threads


class TinyModel:
    """A tiny checkpoint on disk, its transformers model (the oracle) and artifacts compiled from it."""

    def __init__(self, folder: Path, model, layout: str):
        self.folder, self.model, self.layout = folder, model, layout
        self._artifacts: dict[tuple[str, str], Path] = {}

    def artifact(self, quant: str = "q4", dense_quant: str = "q8", q4_group: int = 32) -> Path:
        key = (quant, dense_quant, q4_group)
        if key not in self._artifacts:
            out = self.folder.parent / f"{self.folder.name}-{quant}-{dense_quant}-g{q4_group}.krs"
            compile_model(str(self.folder), out, quant=quant, dense_quant=dense_quant, progress=False,
                          q4_group=q4_group)
            self._artifacts[key] = out
        return self._artifacts[key]

    @torch.no_grad()
    def reference_logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="session", params=["per_expert", "stacked"])
def tiny(request, tmp_path_factory) -> TinyModel:
    folder = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    seed = 0 if request.param == "per_expert" else 1
    model = fixtures.build(folder, request.param, seed=seed)
    return TinyModel(folder, model, request.param)


@pytest.fixture(scope="session")
def tiny_g64(tmp_path_factory) -> TinyModel:
    """The tiny Qwen3-MoE with expert width 64, so q4 groups of 64 columns fit every matrix."""
    folder = tmp_path_factory.mktemp("models") / "tiny-g64"
    return TinyModel(folder, fixtures.build(folder, "per_expert", seed=3, moe_intermediate_size=64), "per_expert")


@pytest.fixture(scope="session")
def tiny_per_expert(tmp_path_factory) -> TinyModel:
    folder = tmp_path_factory.mktemp("models") / "tiny-main"
    return TinyModel(folder, fixtures.build(folder, "per_expert", seed=2), "per_expert")



def _runnable_isas() -> list[str]:
    from krasis_run.kernels import native

    if not native.available():
        return []
    return [i for i in native.ISAS if native.ISAS.index(i) <= native.ISAS.index(native.best_isa())]


@pytest.fixture(params=_runnable_isas())
def isa(request):
    """Each native instruction path this machine can run, restored (with the thread count) afterwards."""
    from krasis_run.kernels import native

    before, threads = native.isa(), native.threads()
    native.set_isa(request.param)
    yield request.param
    native.set_isa(before)
    native.load().krs_set_threads(threads)
