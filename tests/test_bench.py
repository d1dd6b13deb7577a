"""launch/bench.py and rlhf_ds/benchmark.py: behaviour, never timings.

One end-to-end run of the benchmark at its smallest size (tiny random models of the test fixtures, 1 PPO
iteration of 4 prompts x 8 tokens; the generation comparison on 2 ranks through the deepspeed launcher where
the machine can start them, else on 1), the comparison of two result files, and the FLOPs formula on
hand-computed cases.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM

from rlhf_ds import benchmark
from rlhf_ds.models import CriticModel, tiny_qwen2_config

import forked

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "launch" / "bench.py"
REQUIRED = ("generation_naive_zero3_s", "generation_hybrid_zero3_s", "generation_zero2_s", "generation_s",
            "experience_s", "update_s", "iteration_s", "generation_tokens_per_s", "experience_tokens_per_s",
            "update_tokens_per_s", "peak_memory_mb", "update_mfu", "matmul_peak_gflops", "update_gflop",
            "generation_ratio_hybrid_over_zero2", "generation_ratio_naive_over_hybrid",
            "experience_batched_s", "experience_per_sequence_s", "experience_ratio_per_sequence_over_batched",
            "update_forward_s", "update_backward_s", "update_step_s", "peak_memory_generation_mb",
            "peak_memory_experience_mb", "peak_memory_update_mb", "memory_bandwidth_gbps",
            "generation_decode_gbytes", "generation_zero2_roofline_frac", "generation_hybrid_zero3_roofline_frac",
            "loadavg_main", "loadavg_generation")


def _fixture_models(root: Path) -> dict:
    spec = importlib.util.spec_from_file_location("dist_fixtures", REPO / "tests" / "dist" / "fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_models(str(root))


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # One torch thread per rank: several spinning OpenMP threads on a shared CPU can slow a run 30x, and the
    # tests check what the benchmark reports, not how fast it is.
    return forked.run(BENCH, list(args), env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=timeout)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_main(*args: str) -> int:
    """launch/bench.py's ``main`` in this process: for refusals, which happen before it starts any rank."""
    return _bench_module().main(list(args))


# --- one real run --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The whole benchmark at its smallest: 2 ranks for the generation comparison on a CPU or a 2-GPU machine."""
    tmp = tmp_path_factory.mktemp("bench")
    models = _fixture_models(tmp / "models")
    out = tmp / "figures.json"
    proc = _run("--quick", "--json", str(out), "--policy_model", models["policy"], "--reward_model", models["reward"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text()), proc.stdout


def test_json_is_one_flat_object_with_the_required_positive_figures(quick_run):
    figures, _ = quick_run
    assert all(not isinstance(v, (dict, list)) for v in figures.values())
    for key in REQUIRED:
        assert key in figures, key
    for key, value in figures.items():
        if key.endswith(("_s", "_mb", "_gflops", "_gflop", "_mfu")) or "_ratio_" in key:
            assert isinstance(value, float) and value > 0 and math.isfinite(value), (key, value)
    assert figures["iterations"] == 1 and figures["rollout_batch_size"] == 4 and figures["max_new_tokens"] == 8


def test_peak_memory_per_phase(quick_run):
    figures, table = quick_run
    phases = [figures[f"peak_memory_{phase}_mb"] for phase in ("generation", "experience", "update")]
    assert figures["peak_memory_mb"] == max(phases) and 0 < min(phases)
    assert "peak memory per phase" in table


def test_update_parts_fit_inside_the_update(quick_run):
    """The engines' forward, backward and optimizer step are timed inside the update phase (1 iteration)."""
    figures, table = quick_run
    parts = [figures[f"update_{part}_s"] for part in ("forward", "backward", "step")]
    assert all(part > 0 for part in parts) and sum(parts) <= figures["update_s"]
    assert "optimizer step" in table


def test_generation_comparison_is_like_for_like(quick_run):
    figures, _ = quick_run
    assert figures["generation_fixed_length"] == 1  # every row generated max_new_tokens tokens in all three modes
    assert figures["generation_same_tokens"] == 1  # same prompts, same seed, same weights: the same samples
    expected_ranks = 2 if not torch.cuda.is_available() else min(2, torch.cuda.device_count())
    assert figures["generation_ranks"] == figures["ranks"] == expected_ranks
    ratio = figures["generation_hybrid_zero3_s"] / figures["generation_zero2_s"]
    assert figures["generation_ratio_hybrid_over_zero2"] == pytest.approx(ratio)
    if expected_ranks == 2:
        assert figures["ranks2_iteration_s"] > 0 and figures["ranks2_tokens_per_s"] > 0


def test_scaling_grid_and_table(quick_run):
    figures, table = quick_run
    for b, r in ((4, 8), (2, 8), (4, 4)):  # the configured point, half the batch, half the length
        assert figures[f"scaling_b{b}_r{r}_iteration_s"] > 0
    assert "hybrid/zero2" in table and "target <= 1.15" in table and "target >= 3.0" in table
    assert "roofline" in table and "GPU target >= 50%" in table and "GPU target >= 30%" in table
    assert "MFU" in table and "loadavg" in table


def test_qwen2_small_swaps_in_a_random_qwen2_of_that_shape(quick_run, tmp_path):
    """--model qwen2-small: a random-init 8 x 512 Qwen2 (the policy's tokenizer) in the main section (--only);
    the update's FLOPs show that the bigger model, not the policy, was timed. It runs GRPO: the bench times a
    critic-free estimator too."""
    models = _fixture_models(tmp_path / "models")
    out = tmp_path / "small.json"
    proc = _run("--quick", "--ranks", "1", "--model", "qwen2-small", "--only", "main", "--json", str(out),
                "--policy_model", models["policy"], "--reward_model", models["reward"],
                "--advantage_estimator", "grpo", "--samples_per_prompt", "2", "--mini_batch_size", "4")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    small, tiny = json.loads(out.read_text()), quick_run[0]
    assert small["model"] == "qwen2-small" and small["update_gflop"] > 100 * tiny["update_gflop"]
    # a critic-free estimator: no critic built, timed or counted
    assert (small["advantage_estimator"], tiny["advantage_estimator"]) == ("grpo", "gae")
    assert "update, actor (no critic):" in proc.stdout and "update, actor and critic:" in quick_run[1]
    assert not any(key.startswith(("generation_same", "generation_zero2", "scaling_", "experience_batched", "ranks2"))
                   for key in small)  # the sections not chosen


def test_only_names_known_sections_and_ranks_brings_scaling(capsys):
    bench = _bench_module()
    assert bench.chosen_sections("") == list(bench.SECTIONS)
    assert bench.chosen_sections("generation,main") == ["main", "generation"]
    assert bench.chosen_sections("ranks") == ["scaling", "ranks"]
    assert bench_main("--only", "main,speed") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only 'main,speed': unknown section(s) speed") and len(err.splitlines()) == 1


# --- --compare -----------------------------------------------------------------------------------------------

def test_compare_flags_only_regressions_beyond_the_threshold(tmp_path):
    old = {"generation_s": 1.0, "update_s": 2.0, "iteration_tokens_per_s": 100.0, "update_mfu": 0.2,
           "peak_memory_mb": 500.0, "generation_ratio_naive_over_hybrid": 4.0, "loadavg_main": 0.5,
           "zero_stage": 2, "model": "embedded", "experience_s": 1.0}
    new = {**old, "generation_s": 1.2, "update_s": 2.1, "iteration_tokens_per_s": 95.0, "update_mfu": 0.1,
           "peak_memory_mb": 400.0, "generation_ratio_naive_over_hybrid": 3.0, "loadavg_main": 3.0,
           "experience_s": 0.5}
    rows, regressions = benchmark.compare(old, new)
    flags = {key: flag for key, _, _, _, flag in rows}
    assert set(regressions) == {"generation_s", "update_mfu", "generation_ratio_naive_over_hybrid"}
    assert flags["update_s"] == "" and flags["iteration_tokens_per_s"] == ""  # 5% worse: inside the threshold
    assert flags["experience_s"] == "improved" and flags["peak_memory_mb"] == "improved"
    assert flags["loadavg_main"] == "" and flags["zero_stage"] == ""  # facts, not figures
    ratios = {key: ratio for key, _, _, ratio, _ in rows}
    assert ratios["generation_s"] == pytest.approx(1.2)

    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    proc = _run("--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert lines["generation_s"].endswith("REGRESSION") and "1.200" in lines["generation_s"]
    assert "REGRESSION" not in lines["update_s"]
    assert "3 regression(s)" in proc.stdout
    assert benchmark.compare(old, old)[1] == []


def test_direction_of_each_kind_of_figure():
    assert benchmark.direction("update_s") == "lower"
    assert benchmark.direction("generation_zero2_cpu_s") == "lower"
    assert benchmark.direction("peak_rss_mb") == "lower"
    assert benchmark.direction("generation_tokens_per_s") == "higher"
    assert benchmark.direction("generation_zero2_roofline_frac") == "higher"
    assert benchmark.direction("memory_bandwidth_gbps") is None
    assert benchmark.direction("update_mfu") == "higher"
    assert benchmark.direction("generation_ratio_hybrid_over_zero2") == "lower"
    assert benchmark.direction("generation_cpu_ratio_naive_over_hybrid") == "higher"
    assert benchmark.direction("experience_ratio_per_sequence_over_batched") is None
    for fact in ("loadavg_main", "matmul_peak_gflops", "rollout_batch_size", "torch_version"):
        assert benchmark.direction(fact) is None


# --- FLOPs ---------------------------------------------------------------------------------------------------

def test_forward_backward_flops_hand_computed():
    # body 10 params x 2 rows x 3 tokens x 6 = 360; head 5 params x 2 rows x 1 position x 6 = 60;
    # attention 12 x 2 layers x width 4 x context 3 x 6 tokens = 1728.
    assert benchmark.forward_backward_flops(10, 2, 3, head_params=5, head_positions=1, layers=2,
                                            attention_width=4) == 360 + 60 + 1728
    assert benchmark.forward_backward_flops(1000, 4, 16) == 6 * 1000 * 64


def _tiny_qwen2(vocab: int = 50, hidden: int = 16) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_qwen2_config(vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                                              hidden_size=hidden))


def test_flop_params_leave_out_the_embedding_lookup_and_count_a_tied_head_once():
    policy = _tiny_qwen2()
    total = sum(p.numel() for p in policy.parameters())  # tied: the embedding is counted once here
    body, head = benchmark.flop_params(policy)
    assert head == 50 * 16 and body == total - 50 * 16
    critic = CriticModel(_tiny_qwen2().model)
    critic_body, critic_head = benchmark.flop_params(critic)
    assert critic_head == 0 and critic_body == body + 16 + 1  # the same backbone, plus the value head
    assert benchmark.attention_dims(policy) == (2, 16) and benchmark.attention_dims(critic) == (2, 16)


def test_update_flops_sums_actor_and_critic_over_epochs():
    policy, critic = _tiny_qwen2(), CriticModel(_tiny_qwen2().model)
    body, head = benchmark.flop_params(policy)
    rows, seq_len, response_len, epochs = 8, 20, 5, 2
    actor = 6 * body * rows * seq_len + 6 * head * rows * response_len + 12 * 2 * 16 * seq_len * rows * seq_len
    value = 6 * (body + 17) * rows * seq_len + 12 * 2 * 16 * seq_len * rows * seq_len
    assert benchmark.update_flops(policy, critic, rows, seq_len, response_len, epochs) == epochs * (actor + value)


def test_decode_bytes_against_a_step_by_step_sum():
    """Each of R steps reads every parameter and the KV cache of P + t tokens per row (t = 0 .. R-1)."""
    param_bytes, per_token, batch, prompt_len, new_tokens = 1000, 24, 3, 5, 7
    expected = sum(param_bytes + per_token * batch * (prompt_len + t) for t in range(new_tokens))
    assert benchmark.decode_bytes(param_bytes, per_token, batch, prompt_len, new_tokens) == expected
    assert benchmark.decode_bytes(param_bytes, per_token, batch, prompt_len, 1) == param_bytes + per_token * 15


def test_kv_cache_bytes_per_token_of_qwen2_0_5b():
    """24 layers x 2 KV heads x 64 dims x (K and V) x 2 bytes in bf16."""
    from rlhf_ds.models import kv_cache_bytes_per_token, qwen2_0_5b_config

    assert kv_cache_bytes_per_token(qwen2_0_5b_config(), torch.bfloat16) == 24 * 2 * 64 * 2 * 2


def test_memory_bandwidth_is_measured():
    assert benchmark.memory_bandwidth(torch.device("cpu"), nbytes=8 * 2**20, repeats=2) > 1e8  # > 0.1 GB/s


def test_matmul_peak_and_mfu():
    peak, n = benchmark.matmul_peak_flops(torch.float32, torch.device("cpu"), max_n=256, repeats=1)
    assert peak > 0 and n == 256
    assert benchmark.mfu(2e9, 2.0, 1e10) == pytest.approx(0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("model, needle", [("qwen2-0.5b-shape", "GPU"), ("deberta-v3-large-shape:2", "choose"),
                                           ("qwen2-0.5b-shape:x", "number of layers")])
def test_a_model_the_bench_cannot_run_here_is_refused_with_one_line(model, needle, capsys):
    """Refused in the bench's parent process before any rank starts (its main, in this process)."""
    assert bench_main("--model", model) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and needle in err


def test_bad_override_is_a_one_line_error(capsys):
    assert bench_main("--rollout_batch_size", "3", "--mini_batch_size", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rollout_batch_size" in err


# --- the optimisations keep behaviour ---------------------------------------------------------------------------

def test_torch_linear_undoes_only_deepspeeds_zero3_linear_and_restores_it():
    import torch.nn.functional as F
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from rlhf_ds.zero3 import torch_linear

    original = F.linear
    try:
        F.linear = zero3_linear_wrap  # what loading a model under ZeRO-3 does to the whole process
        with torch_linear():
            assert F.linear is torch._C._nn.linear
        assert F.linear is zero3_linear_wrap
        with pytest.raises(RuntimeError), torch_linear():
            raise RuntimeError("boom")
        assert F.linear is zero3_linear_wrap

        def other(*args):  # someone else's replacement is not ours to undo
            return original(*args)

        F.linear = other
        with torch_linear():
            assert F.linear is other
    finally:
        F.linear = original


def test_gathered_leaves_a_plain_module_alone():
    from rlhf_ds.zero3 import gathered

    model = torch.nn.Linear(2, 2)
    with gathered(model):
        assert model(torch.ones(1, 2)).shape == (1, 2)


def test_response_logits_ignore_shared_left_padding_and_skip_prompt_logits():
    """...and hand the LM head a contiguous input of the R + 1 kept positions only (a strided one sends torch's
    CPU bf16 matmul to a slow kernel: docs/PERFORMANCE.md)."""
    from rlhf_ds.experience import response_logits, response_values
    from rlhf_ds.models import position_ids_from_mask

    policy = _tiny_qwen2().eval()
    head_inputs = []
    policy.lm_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    critic = CriticModel(_tiny_qwen2().model).eval()
    torch.nn.init.normal_(critic.value_head.weight)
    prompt = torch.tensor([[5, 6, 7], [0, 8, 9]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    response = torch.tensor([[10, 11], [12, 13]])
    padded_prompt = torch.cat([torch.zeros(2, 4, dtype=torch.long), prompt], 1)  # 4 columns nobody uses
    padded_mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), prompt_mask], 1)
    with torch.no_grad():
        for ids, mask in ((prompt, prompt_mask), (padded_prompt, padded_mask)):
            seq, full_mask = torch.cat([ids, response], 1), torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
            logits = response_logits(policy, seq, full_mask, ids.shape[1], temperature=0.5)
            assert head_inputs[-1].shape[1] == 3 and head_inputs[-1].is_contiguous()
            values = response_values(critic, seq, full_mask, ids.shape[1])
            # the plain way: all positions' logits, then the ones that predict the response
            reference = policy(input_ids=seq, attention_mask=full_mask,
                               position_ids=position_ids_from_mask(full_mask)).logits[:, ids.shape[1] - 1:-1] / 0.5
            assert logits.shape == (2, 2, 50) and values.shape == (2, 2)
            torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
            if ids is prompt:
                unpadded_logits, unpadded_values = logits, values
        torch.testing.assert_close(logits, unpadded_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, unpadded_values, rtol=1e-5, atol=1e-5)


# --- the DeepSpeed-Chat preset, contention, the first iteration ----------------------------------------------

def test_dschat_step3_builds_the_shapes_it_was_timed_with(tmp_path):
    """The comparison is only fair on the same inputs: 6.3M-parameter untied Qwen2s (hidden 256, 4 layers, 4 heads,
    MLP 1024, vocabulary 4096) as policy and reward model, and prompts that cut to exactly 64 tokens each."""
    from transformers import AutoConfig

    from rlhf_ds.bench_models import dschat_step3
    from rlhf_ds.config import PPOConfig
    from rlhf_ds.data import PromptCollator, load_prompts
    from rlhf_ds.models import load_reward_model, load_tokenizer

    overrides = dschat_step3(str(tmp_path))
    config = PPOConfig.from_args(overrides + ["--output_dir", str(tmp_path / "run")])
    assert (config.rollout_batch_size, config.mini_batch_size, config.ppo_epochs, config.max_new_tokens,
            config.max_prompt_len, config.precision, config.stop_strings) == (8, 8, 1, 32, 64, "fp32", [])
    policy = AutoConfig.from_pretrained(config.policy_model)
    assert (policy.vocab_size, policy.hidden_size, policy.num_hidden_layers, policy.num_attention_heads,
            policy.num_key_value_heads, policy.intermediate_size, policy.tie_word_embeddings) == (
                4096, 256, 4, 4, 4, 1024, False)
    assert config.critic_model == config.policy_model
    reward = load_reward_model(config.reward_model, torch.float32)
    assert type(reward).__name__ == "Qwen2ForSequenceClassification" and reward.config.num_labels == 1
    assert sum(p.numel() for p in reward.parameters()) == sum(
        p.numel() for p in reward.model.parameters()) + 256  # the body of the policy's shape, one score row
    tokenizer = load_tokenizer(config.policy_model)
    assert len(tokenizer) == 4096
    prompts, _ = load_prompts(config.dataset)
    batch = PromptCollator(tokenizer, 64)(prompts)
    assert batch["input_ids"].shape == (len(prompts), 64) and batch["attention_mask"].all()


def test_dschat_step3_runs_and_contention_measures_next_to_a_busy_process(tmp_path):
    """The preset through the trainer (its Qwen2 reward model reads the policy's decoded text through the
    reward path), with --contention 1: the main section again next to a busy process, recorded and printed."""
    out = tmp_path / "dschat.json"
    proc = _run("--quick", "--ranks", "1", "--model", "dschat-step3", "--only", "main", "--contention", "1",
                "--json", str(out), "--rollout_batch_size", "2", "--mini_batch_size", "2", "--max_new_tokens", "4")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    f = json.loads(out.read_text())  # the user's sizes win over the preset's; its models and prompts stay
    assert f["model"] == "dschat-step3" and f["prompt_len"] == 64 and f["rollout_batch_size"] == 2
    assert f["contention_processes"] == 1 and f["contention_iteration_max_s"] >= f["contention_iteration_s"] > 0
    assert "contention: the main section next to 1 busy process(es)" in proc.stdout


def test_busy_processes_keep_a_core_busy_and_are_gone_afterwards():
    bench = _bench_module()

    def cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    with bench.busy_processes(2) as procs:
        time.sleep(1.0)
        assert all(proc.poll() is None for proc in procs)
        assert all(cpu_seconds(proc.pid) > 0.3 for proc in procs)
    assert all(proc.returncode is not None for proc in procs)
    assert not any(Path(f"/proc/{proc.pid}").exists() for proc in procs)


def test_the_first_iteration_is_recognised_in_the_trainers_own_line():
    """--first_iteration stops its clock at the console line the trainer prints for an iteration, so the pattern
    is checked against ``tracking.format_metrics`` itself (a completed and a skipped iteration)."""
    from rlhf_ds.tracking import format_metrics

    bench = _bench_module()
    done = {"iteration": 0, "score_mean": 0.1, "reward_mean": 0.1, "kl_divergence": 0.0, "kl_coef": 0.2,
            "policy_loss": 0.0, "value_loss": 0.1, "entropy": 3.0, "response_length": 9.0, "tokens_per_s": 50.0}
    skipped = {"iteration": 0, "skip_reason": "non-finite loss", "skipped_batches": 1}
    assert all(bench._ITERATION_LINE.match(format_metrics(m) + "\n") for m in (done, skipped))
    assert not bench._ITERATION_LINE.match("iterations = 60\n")


@pytest.mark.parametrize("ours", [1.90, 2.20])
def test_the_dschat_line_gives_the_ratio_without_a_verdict(ours):
    """DeepSpeed-Chat's seconds come from another day and this machine's speed moves by 2x between days, so the
    line gives the ratio and says it is not a same-day one; it must not call the target met (it did at 1.90)."""
    bench = _bench_module()
    f = {"rollout_batch_size": 8, "max_new_tokens": 32, "zero_stage": 2, "ranks2_iteration_s": ours,
         "ranks2_tokens_per_s": 1.0, "loadavg_ranks2": 0.5, "dschat_step3_iteration_s": 2.91,
         "ratio_over_dschat_step3": ours / 2.91}
    line = bench._ranks_lines(f)[-1]
    assert f"ours/theirs {ours / 2.91:.2f} (target <= 0.67 on the same day" in line and "ZeRO-2" in line
    assert "another day" in line and not re.search(r"\b(met|MISSED)\b", line)
