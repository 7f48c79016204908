"""Hybrid decode (GPU in the decode loop, CPU for the experts left in RAM). The engine code runs here on
the CPU (device="cpu"); the CUDA tests run it with CUDA graphs on the GPU host (docs/BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import prompt_ids

import krasis_run
from krasis_run import decode_hybrid
from krasis_run.decode_hybrid import HybridDecodeEngine
from krasis_run.kernels import decode_gpu
from krasis_run.kernels.decode_gpu import linear_q8
from krasis_run.models import qwen3_moe
from krasis_run.planner import GIB, kv_cache_bytes, plan
from krasis_run.prefill_gpu import GpuPrefillEngine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU host)")


def hybrid_engine(rt, resident: set[int], device: str = "cpu", section: str = "experts_gpu",
                  **kwargs) -> HybridDecodeEngine:
    prefill = GpuPrefillEngine(qwen3_moe, rt.args, rt.artifact, device, resident, section)
    return HybridDecodeEngine(qwen3_moe, rt.args, rt.artifact, prefill, rt.ops, rt.model.w, context=96, **kwargs)


def greedy(rt, engine, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    cache = engine.new_cache(len(ids) + steps)
    logits = engine.prefill(ids, cache)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits.float().numpy())
        tokens.append(int(torch.argmax(logits)))
        logits = engine.decode(tokens[-1], cache)
    return tokens, all_logits


def assert_same_greedy(got: list[int], want: list[int], want_logits: list[np.ndarray], tie: float = 1e-2) -> None:
    """Equal tokens up to the first near-tie of the reference (top two logits closer than `tie`, where
    float rounding order alone can pick either); that must leave most of the sequence to compare."""
    top2 = [np.sort(step)[-2:] for step in want_logits]
    n = next((i for i, (a, b) in enumerate(top2) if b - a < tie), len(want))
    assert n >= len(want) // 2, f"reference has a near-tie at step {n}: pick another prompt"
    assert got[:n] == want[:n]


@pytest.mark.parametrize("quant,dense", [("q4", "q8"), ("q8", "q8"), ("bf16", "bf16")])
@pytest.mark.parametrize("resident,mode", [(set(), "experts_in_ram"), ({1}, "budget"), ({0, 1, 2}, "all_gpu")])
def test_hybrid_decode_equals_cpu_path(tiny, quant, dense, resident, mode):
    """Same arithmetic on both sides (float32 activations: the CPU reference kernels), so the same tokens;
    the native kernels' int8 activations are held to the error bounds below instead."""
    rt = krasis_run.load(tiny.artifact(quant, dense), threads=1, kernel="reference")
    assert_hybrid_equals_cpu(rt, resident, mode, prompt_ids(rt.args.vocab_size, 20, seed=5),
                             1e-2 if quant == "bf16" else 3e-2)


def assert_hybrid_equals_cpu(rt, resident: set[int], mode: str, ids: list[int], bound: float) -> None:
    """12 greedy steps of a hybrid engine (on this CPU) against the runtime's CPU engine: the placement `mode`, the
    same tokens up to the reference's first near-tie, every step's logits within `bound`."""
    want_tokens, want_logits = greedy(rt, rt.engine, ids, 12)
    engine = hybrid_engine(rt, resident)
    assert engine.mode == mode
    got_tokens, got_logits = greedy(rt, engine, ids, 12)
    assert_same_greedy(got_tokens, want_tokens, want_logits)
    for got, want in zip(got_logits, want_logits, strict=True):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound


@pytest.mark.parametrize("resident", [set(), {0, 2}])
def test_hybrid_decode_with_native_cpu_experts_within_bounds(tiny, resident):
    """Teacher-forced: both paths see the CPU path's greedy tokens; logits stay within the q4 bound."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=1)
    ids = prompt_ids(rt.args.vocab_size, 20, seed=6)
    tokens, want = greedy(rt, rt.engine, ids, 10)
    engine = hybrid_engine(rt, resident)
    cache = engine.new_cache(40)
    got = [engine.prefill(ids, cache)] + [engine.decode(t, cache) for t in tokens[:-1]]
    for g, w in zip(got, want, strict=True):
        assert np.linalg.norm(g.numpy() - w) / np.linalg.norm(w) < 3e-2


def test_hot_experts_follow_the_prefill_routing(tiny):
    """Hot experts: after a prefill, the most-picked experts of the streamed layers go to the GPU (up to the
    byte budget), decode computes them there and the rest on the CPU, with the same tokens; the next prefill
    drops them."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 30, seed=8)
    want_tokens, want_logits = greedy(rt, rt.engine, ids, 10)
    per_expert = rt.artifact.tensor("layers.0.experts_cpu").length / rt.args.num_experts
    engine = hybrid_engine(rt, {1}, hot_bytes=int(5.5 * per_expert))
    got_tokens, _ = greedy(rt, engine, ids, 10)
    assert_same_greedy(got_tokens, want_tokens, want_logits)
    counts = engine.prefill_engine.ops.routing_counts
    hot = {i: engine.layers[i].resident for i in (0, 2)}
    assert sum(len(v) for v in hot.values()) == 5 and engine.hot_stats["experts"] == 5
    ranked = sorted(((int(c), i, e) for i in (0, 2) for e, c in enumerate(counts[i].tolist())), reverse=True)
    assert all(int(counts[i][e]) >= ranked[4][0] for i in (0, 2) for e in hot[i])  # the five most picked
    assert engine.layers[1].resident == list(range(rt.args.num_experts))  # the resident layer stays whole
    assert 0 < engine.timing["cpu_picks"] < 10 * 2 * 3  # some picks went to the CPU, some did not
    engine.prefill_engine.prefill(ids, engine.new_cache(40))  # as Runtime calls it: the engine hears of it
    assert engine.layers[0].resident == [] and engine.layers[2].resident == [] and engine.hot_pending


@pytest.mark.parametrize("room_experts", [0, 2.5])
def test_hot_experts_kept_while_the_layers_stream(tiny, monkeypatch, room_experts):
    """Where the prompt leaves part of the prefill workspace free, each streamed layer keeps its most-picked experts
    as they pass through VRAM (its share of that room), so the first decode step loads none; with no room the
    experts are loaded after the prefill as before. The same tokens either way."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 30, seed=8)
    want_tokens, want_logits = greedy(rt, rt.engine, ids, 10)
    per_expert = max(c.length for c in rt.artifact.chunks.values() if c.section == "experts_gpu") / rt.args.num_experts
    room = int(2 * room_experts * per_expert)  # two streamed layers
    seen = []
    engine = hybrid_engine(rt, {1}, hot_bytes=int(5.5 * per_expert),
                           prefill_hot_room=lambda tokens: seen.append(tokens) or room)
    loads = []
    monkeypatch.setattr(engine, "_load_hot", lambda real=engine._load_hot: loads.append(1) or real())
    got_tokens, _ = greedy(rt, engine, ids, 10)
    assert_same_greedy(got_tokens, want_tokens, want_logits)
    assert seen == [len(ids)]
    counts = engine.prefill_engine.ops.routing_counts
    if room_experts:
        assert engine.hot_kept and loads == []
        for i in (0, 2):
            c = counts[i].tolist()
            hot = engine.layers[i].resident
            assert len(hot) == 2 and min(c[e] for e in hot) >= max(c[e] for e in range(len(c)) if e not in hot)
        assert engine.hot_stats["experts"] == 4 and 0 < engine.hot_stats["prefill_pick_share"] < 1
    else:
        assert not engine.hot_kept and loads == [1] and engine.hot_stats["experts"] == 5
    assert engine.layers[1].resident == list(range(rt.args.num_experts))
    if room_experts:  # a second prompt with the same room: the same buffers, refilled in place
        buffers = dict(engine.hot_tiles)
        ids2 = prompt_ids(rt.args.vocab_size, 30, seed=13)
        want2, want2_logits = greedy(rt, rt.engine, ids2, 10)
        got2, _ = greedy(rt, engine, ids2, 10)
        assert_same_greedy(got2, want2, want2_logits)
        assert all(engine.hot_tiles[i] is buffers[i] and engine.layers[i].tiles is buffers[i] for i in (0, 2))
        assert loads == []


def test_remote_experts_split_the_cpu_picks(tiny):
    """Remote experts: of the picks left to the CPU, the GPU takes the most-routed experts' share (reading their
    tiles in host memory; here on the CPU device, the mapping itself), with the same tokens."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 30, seed=9)
    want_tokens, want_logits = greedy(rt, rt.engine, ids, 10)
    engine = hybrid_engine(rt, {1}, remote_share=0.5)
    got_tokens, _ = greedy(rt, engine, ids, 10)
    assert_same_greedy(got_tokens, want_tokens, want_logits)
    counts = engine.prefill_engine.ops.routing_counts
    for i in (0, 2):
        layer = engine.layers[i]
        c = counts[i].tolist()
        assert layer.remote and layer.on_gpu and layer.on_cpu
        share = sum(c[e] for e in layer.remote) / sum(c)
        assert share >= 0.5 and share - c[layer.remote[-1]] / sum(c) < 0.5  # the fewest experts that reach half
        assert min(c[e] for e in layer.remote) >= max(c[e] for e in range(len(c)) if e not in layer.remote)
    assert engine.layers[1].remote == []  # a resident layer has nothing to offload
    assert 0 < engine.timing["cpu_picks"] < 10 * 2 * 2


def test_one_copy_of_the_experts_decodes_them_on_the_cpu(tiny):
    """With the prefill streaming the CPU blocks (`--sections cpu`), decode has no tiles to read on the GPU:
    every expert runs on the CPU, hot and remote experts stay off, and the tokens are the CPU path's."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=1, kernel="reference")
    ids = prompt_ids(rt.args.vocab_size, 20, seed=4)
    want_tokens, want_logits = greedy(rt, rt.engine, ids, 10)
    engine = hybrid_engine(rt, {1}, section="experts_cpu", hot_bytes=1 << 30, remote_share=0.5)
    assert engine.mode == "experts_in_ram" and engine.hot_bytes == 0 and engine.remote_share == 0
    got_tokens, _ = greedy(rt, engine, ids, 10)
    assert_same_greedy(got_tokens, want_tokens, want_logits)
    assert engine.timing["cpu_picks"] == 10 * 3 * rt.args.num_experts_per_tok


def test_a_new_sequence_takes_the_gpu_kv_cache(tiny_per_expert):
    """One KV storage on the GPU: a paused sequence whose cache was handed to another must fail, not decode over
    the other's keys."""
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    engine = hybrid_engine(rt, {1})
    first = engine.new_cache(40)
    engine.prefill(prompt_ids(rt.args.vocab_size, 10, seed=1), first)
    engine.decode(5, first)
    second = engine.new_cache(40)
    engine.prefill(prompt_ids(rt.args.vocab_size, 12, seed=2), second)
    with pytest.raises(krasis_run.KrsError, match="another sequence has taken the GPU KV cache"):
        engine.decode(6, first)
    engine.decode(6, second)


def test_planner_needs_room_for_the_stream_buffers(tiny_per_expert, monkeypatch):
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * GIB, 80 * GIB))
    vram = plan(rt.artifact, "cuda", "8GiB", context=64).vram_plan
    fixed = vram["dense"] + vram["workspace"] + vram["kv_cache"]
    layer = vram["resident_experts"] // 3
    with pytest.raises(krasis_run.KrsError, match="2 streaming buffers"):
        plan(rt.artifact, "cuda", fixed + layer, context=64)  # room for one layer, not for two stream buffers


def test_hybrid_cache_holds_what_prefill_wrote(tiny_per_expert):
    """The K/V the prefill engine writes are the ones decode attends over (no copy between them)."""
    rt = krasis_run.load(tiny_per_expert.artifact("bf16", "bf16"), threads=1)
    engine = hybrid_engine(rt, {1})
    ids = prompt_ids(rt.args.vocab_size, 10, seed=3)
    cache = engine.new_cache(16)
    engine.prefill(ids, cache)
    assert cache.length == 10 and cache.keys[0].data_ptr() == engine.kv.keys[0].data_ptr()
    cpu_cache = rt.engine.new_cache(16)
    rt.engine.prefill(ids, cpu_cache)
    for layer in range(rt.args.num_hidden_layers):
        for got, want in ((cache.keys, cpu_cache.keys), (cache.values, cpu_cache.values)):
            got, want = got[layer][:10].float(), want[layer][:10].float()
            assert float((got - want).norm() / want.norm()) < 1e-2
    with pytest.raises(krasis_run.KrsError, match="do not fit the GPU KV cache"):
        engine.new_cache(97)


def test_expert_bytes_split_by_placement(tiny_per_expert):
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    none, some, every = (hybrid_engine(rt, r).expert_bytes_per_token() for r in (set(), {1}, {0, 1, 2}))
    assert none["gpu"] == 0 and every["cpu"] == 0 and none["cpu"] == every["gpu"] > 0
    assert some["cpu"] == pytest.approx(none["cpu"] * 2 / 3) and some["gpu"] == pytest.approx(none["cpu"] / 3)


def test_planner_reserves_the_kv_cache(tiny_per_expert, monkeypatch):
    """With a (pretend) GPU, the context's KV cache comes out of the budget before any expert layer."""
    rt = krasis_run.load(tiny_per_expert.artifact("q4", "q8"), threads=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * GIB, 80 * GIB))
    config = rt.artifact.header["config"]
    whole = plan(rt.artifact, "cuda", "8GiB", context=64)
    assert whole.decode_device == "cuda" and whole.context == 64 and len(whole.resident_layers) == 3
    assert whole.vram_plan["kv_cache"] == kv_cache_bytes(config, 64) == 2 * 3 * 64 * 2 * 16 * 2
    assert plan(rt.artifact, "cuda", "8GiB", context=64, max_resident_layers=0).resident_layers == frozenset()
    assert plan(rt.artifact, "cuda", "8GiB", context=10**9).context == config["max_position_embeddings"]
    need = whole.vram_plan["dense"] + whole.vram_plan["workspace"] + whole.vram_plan["kv_cache"]
    with pytest.raises(krasis_run.KrsError, match="too small: dense weights, the KV cache"):
        plan(rt.artifact, "cuda", need - 1, context=64)


@cuda
@pytest.mark.parametrize("quant,dense", [("q4", "q8"), ("q8", "q8"), ("bf16", "bf16")])
@pytest.mark.parametrize("resident", [set(), {1}, {0, 1, 2}])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("q8_int8", [True, False])
def test_cuda_hybrid_decode_equals_cpu_path(tiny, quant, dense, resident, graphs, q8_int8, monkeypatch):
    """Teacher-forced (both see the CPU path's greedy tokens): logits within the bounds at every step, and the
    same greedy choice wherever the CPU's top two logits are further apart than the quantized paths' noise.
    q8_int8 (decode_gpu.Q8_INT8): the q8 GEMVs read the int8 groups the norms and the attention write."""
    monkeypatch.setattr(decode_gpu, "Q8_INT8", q8_int8)
    int8_calls = []

    def counted(*args, **kwargs):
        int8_calls.append(kwargs.get("x_int8") is not None)
        return linear_q8(*args, **kwargs)

    monkeypatch.setattr(decode_hybrid, "linear_q8", counted)
    rt = krasis_run.load(tiny.artifact(quant, dense), threads=2)
    ids = prompt_ids(rt.args.vocab_size, 20, seed=5)
    tokens, want_logits = greedy(rt, rt.engine, ids, 16)
    engine = hybrid_engine(rt, resident, "cuda", graphs=graphs)
    cache = engine.new_cache(40)
    got_logits = [engine.prefill(ids, cache)] + [engine.decode(t, cache) for t in tokens[:-1]]
    assert any(int8_calls) == (q8_int8 and dense == "q8")
    tie = 1e-2 if quant == "bf16" else 0.1
    for got, want in zip(got_logits, want_logits, strict=True):
        got = got.float().numpy()
        # each path rounds its activations its own way (GPU bf16, CPU int8), so q4 gets the q4 oracle bound
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < {"bf16": 1e-2, "q8": 3e-2, "q4": 0.2}[quant]
        top2 = np.sort(want)[-2:]
        assert top2[1] - top2[0] < tie or int(np.argmax(got)) == int(np.argmax(want))


@cuda
def test_cuda_runtime_generates_like_the_cpu_runtime(tiny_per_expert):
    """`load(device="cuda")`: GPU prefill, hybrid decode with graphs, same greedy tokens as the CPU runtime."""
    path = tiny_per_expert.artifact("q4", "q8")
    ids = prompt_ids(300, 24, seed=9)
    cpu = krasis_run.load(path, device="cpu", threads=2)
    want = list(cpu.generate(ids, max_new_tokens=20, stop_token_ids=set()))
    for budget_layers in (0, 1, None):
        gpu = krasis_run.load(path, device="cuda", threads=2, context=256, max_resident_layers=budget_layers)
        assert list(gpu.generate(ids, max_new_tokens=20, stop_token_ids=set())) == want
        assert list(gpu.generate(ids, max_new_tokens=20, stop_token_ids=set())) == want  # graphs replayed
        gpu.close()


@cuda
def test_cuda_hot_experts_kept_in_place_keep_the_graph(tiny):
    """Hot experts kept from the stream buffer into buffers that stay between prompts: the second prompt's decode
    replays the graph captured for the first (no capture), with that prompt's hot experts, and gives the CPU path's
    tokens for both prompts."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=2)
    per_expert = max(c.length for c in rt.artifact.chunks.values() if c.section == "experts_gpu") / rt.args.num_experts
    engine = hybrid_engine(rt, {1}, "cuda", hot_bytes=int(8 * per_expert), prefill_hot_room=lambda t: 1 << 40)
    prompts = []  # two prompts whose CPU continuation has its first near-tie late (the paths round differently)
    for seed in range(40):
        ids = prompt_ids(rt.args.vocab_size, 20, seed=seed)
        want, want_logits = greedy(rt, rt.engine, ids, 12)
        if all(np.diff(np.sort(step)[-2:])[0] >= 0.05 for step in want_logits[:8]):
            prompts.append((ids, want, want_logits))
        if len(prompts) == 2:
            break
    assert len(prompts) == 2
    for ids, want, want_logits in prompts:
        got, _ = greedy(rt, engine, ids, 12)
        assert_same_greedy(got, want, want_logits, tie=0.05)
        assert engine.hot_kept and all(len(engine.layers[i].resident) == 4 for i in (0, 2))
    assert engine.captures == 1


@cuda
@pytest.mark.parametrize("resident", [set(), {1}])
def test_cuda_one_graph_step_equals_the_event_path(tiny, resident):
    """Where the driver lets a graph set and wait on host flags, a step with CPU layers is one graph and one native
    call serving those layers: its logits equal, bit for bit, those of the per-layer graphs with event waits (the
    same kernels on the same inputs), step after step."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=2)
    ids = prompt_ids(rt.args.vocab_size, 20, seed=5)
    one = hybrid_engine(rt, resident, "cuda")
    assert one.flags is not None, "stream memory operations unavailable on this GPU host"
    split = hybrid_engine(rt, resident, "cuda")
    split.flags = None
    runs = []
    for engine in (one, split):
        cache = engine.new_cache(40)
        logits = [engine.prefill(ids, cache)]
        for _ in range(10):
            logits.append(engine.decode(int(torch.argmax(logits[-1])), cache))
        runs.append(logits)
    assert [p[0] for p in one.plan] == ["graph", "serve"] and "cpu" in [p[0] for p in split.plan]
    assert one.timing["cpu_picks"] == split.timing["cpu_picks"] > 0
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_hot_buffers_follow_the_room(tiny):
    """The hot buffers stay for prompts whose room holds them and not twice them (so the captured step stays valid),
    are made again where the room doubles or falls short, and never hold more experts than a layer has."""
    rt = krasis_run.load(tiny.artifact("q4", "q8"), threads=1, kernel="reference")
    per_expert = max(c.length for c in rt.artifact.chunks.values() if c.section == "experts_gpu") / rt.args.num_experts
    rooms = iter([4, 5, 8, 3, 1000])  # experts a layer (two streamed layers)
    engine = hybrid_engine(rt, {1}, hot_bytes=1 << 40,
                           prefill_hot_room=lambda tokens: int(next(rooms) * 2 * per_expert) + 1)
    ids = prompt_ids(rt.args.vocab_size, 30, seed=8)
    seen = []
    for _ in range(5):
        engine.prefill_engine.prefill(ids, engine.new_cache(40))
        seen.append((engine.hot_capacity, engine.hot_tiles[0]))
    capacities = [c for c, _ in seen]
    assert capacities == [4, 4, 8, 3, rt.args.num_experts]
    assert seen[1][1] is seen[0][1] and seen[2][1] is not seen[1][1]  # kept at 5, made again at 8
    assert all(len(engine.layers[i].resident) == rt.args.num_experts for i in (0, 2))
