"""benchmarks/memory.py at a tiny shape: XLA byte counts against hand-computed parameter counts.

Every expected byte count below is written from the architecture (Llama block: q/k/v/o,
gate/up/down, two RMSNorms; tied embeddings; scalar head d + 1), not read from the code.
"""

import pytest

from benchmarks import memory as M
from benchmarks.memory_setup import model_config

D, LAYERS, HEADS, KV, HD, FF, VOCAB, RANK = 64, 2, 4, 2, 16, 128, 256, 4
DIMS = dict(
    vocab_size=VOCAB,
    d_model=D,
    n_layers=LAYERS,
    n_heads=HEADS,
    n_kv_heads=KV,
    head_dim=HD,
    d_ff=FF,
    tie_embeddings=True,
)
WORKLOAD = dict(rm_pairs=2, rm_len=16, ppo_rollouts=2, prompt_len=8, response_len=8)

# Projections of one layer as (in, out).
PROJ = [(D, HEADS * HD), (D, KV * HD), (D, KV * HD), (HEADS * HD, D), (D, FF), (D, FF), (FF, D)]
LORA_PROJ = PROJ[:4]  # q, k, v, o
N_PROJ = LAYERS * sum(i * o for i, o in PROJ)  # quantised weights
N_SCALES = LAYERS * sum(o for _, o in PROJ)  # one float32 scale per output channel
N_BACKBONE = VOCAB * D + N_PROJ + LAYERS * 2 * D + D  # embed + projections + norms + final norm
N_HEAD = D + 1
N_LORA = LAYERS * sum(RANK * (i + o) for i, o in LORA_PROJ)
ADAM_SCALARS = 64  # optax's int32 step counters in the optimizer state: a few bytes
RM_BATCH = 4 * WORKLOAD["rm_pairs"] * WORKLOAD["rm_len"] * 4  # ids + masks of chosen and rejected, int32
ROLLOUT = 8 * WORKLOAD["ppo_rollouts"] * WORKLOAD["prompt_len"] * 4  # 8 [B, 8] arrays of 4 bytes (P == N)
STEP_AND_RNG = 4 + 8  # int32 step, uint32[2] key data


def variant(base, remat=False):
    return M.Variant(base, remat, lora_rank=RANK, lora_alpha=8.0)


@pytest.fixture(scope="module")
def rm():
    return {b: M.abstract_memory("rm", DIMS, variant(b), WORKLOAD) for b in ("fp32", "lora", "lora_int8")}


def test_hand_counts_are_consistent():
    # Independent check of the formulas above against TransformerConfig.num_params (no lm_head: tied).
    assert model_config(DIMS, variant("fp32")).num_params() == N_BACKBONE


def test_rm_numbers_positive_and_formula(rm):
    for stats in rm.values():
        assert all(stats[k] > 0 for k in ("argument", "output", "temp", "alias", "peak"))
        assert stats["peak"] == stats["argument"] + stats["temp"] + stats["output"] - stats["alias"]
        # The donated train state is reused in place: everything aliased is an output.
        assert stats["alias"] <= stats["output"]


def test_rm_full_vs_lora_bytes_by_hand(rm):
    full, lora = rm["fp32"], rm["lora"]
    n_all = N_BACKBONE + N_HEAD
    assert full["trees"]["trainable_params"] == 4 * n_all
    assert 0 <= full["trees"]["opt_state"] - 8 * n_all < ADAM_SCALARS  # mu + nu, float32
    assert lora["trees"]["trainable_params"] == 4 * (N_LORA + N_HEAD)
    assert 0 <= lora["trees"]["opt_state"] - 8 * (N_LORA + N_HEAD) < ADAM_SCALARS
    assert lora["trees"]["frozen"] == 4 * N_BACKBONE
    # XLA's argument bytes are exactly the trees + step + rng.
    for stats, frozen in ((full, 0), (lora, 4 * N_BACKBONE)):
        assert stats["argument"] == sum(stats["trees"].values()) + STEP_AND_RNG
        assert stats["trees"]["batch"] == RM_BATCH and stats["trees"]["frozen"] == frozen
    # LoRA saves the frozen parameters' two Adam moments, less the adapters' own moments ...
    frozen_moments = 8 * N_BACKBONE
    opt_saving = full["trees"]["opt_state"] - lora["trees"]["opt_state"]
    assert opt_saving == frozen_moments - 8 * N_LORA
    # ... and in the step's arguments the same, less the adapters' own weights (the base stays resident).
    assert full["argument"] - lora["argument"] == frozen_moments - 12 * N_LORA
    assert full["argument"] - lora["argument"] >= 0.8 * frozen_moments  # adapters are small next to the base
    assert lora["peak"] < full["peak"]


def test_int8_frozen_tree_is_a_quarter(rm):
    lora, int8 = rm["lora"], rm["lora_int8"]
    float_kernels = 4 * N_PROJ
    int8_kernels = N_PROJ + 4 * N_SCALES  # qvalue int8 + float32 scales
    assert int8["trees"]["frozen"] == lora["trees"]["frozen"] - float_kernels + int8_kernels
    assert lora["argument"] - int8["argument"] == float_kernels - int8_kernels
    ratio = int8_kernels / float_kernels
    assert 0.25 < ratio < 0.25 + 1.0 / D + 1e-9  # 1/4 plus one scale per output column
    # Adapters and the head are untouched by quantisation.
    assert int8["trees"]["trainable_params"] == lora["trees"]["trainable_params"]


def test_ppo_arguments_hold_all_four_models():
    n_value = N_BACKBONE + N_HEAD  # the value model is the reward model's tree
    full = M.abstract_memory("ppo", DIMS, variant("fp32"), WORKLOAD)
    t = full["trees"]
    assert t["trainable_params"] == 4 * (N_BACKBONE + n_value)  # policy + value
    assert 0 <= t["opt_state"] - 8 * (N_BACKBONE + n_value) < ADAM_SCALARS
    assert t["reference"] == 4 * N_BACKBONE and t["reward"] == 4 * n_value and t["frozen"] == 0
    assert t["rollout"] == ROLLOUT
    assert full["argument"] == sum(t.values()) + STEP_AND_RNG

    small = M.abstract_memory("ppo", DIMS, variant("lora_int8", remat=True), WORKLOAD)
    t = small["trees"]
    int8_backbone = 4 * (N_BACKBONE - N_PROJ) + N_PROJ + 4 * N_SCALES
    assert t["trainable_params"] == 4 * (2 * N_LORA + N_HEAD)  # adapters of policy and value + value head
    assert t["frozen"] == 2 * int8_backbone  # int8 policy base + int8 value base (value.quant)
    assert t["reference"] == 0  # adapters off: the policy's base is the reference
    assert t["reward"] == int8_backbone + 4 * N_HEAD
    assert small["argument"] == sum(t.values()) + STEP_AND_RNG
    assert all(small[k] > 0 for k in ("argument", "output", "temp", "peak"))
    assert small["peak"] < full["peak"]


def test_depth_extrapolation(rm):
    # Affine fit through 1 and 3 layers vs the 2-layer step compiled directly (the fixture's).
    fit = M.scaled_memory("rm", DIMS, variant("fp32"), WORKLOAD, (1, 3))
    direct = rm["fp32"]
    for key in ("argument", "output", "alias"):
        assert fit[key] == direct[key]
    assert fit["temp"] == pytest.approx(direct["temp"], rel=0.05)
    assert M._affine({2: {"x": 10, "compile_s": 1.0}, 4: {"x": 20, "compile_s": 1.0}}, 16)["x"] == 80
