"""The rehearsal of the real run (launch/rehearse.py) in its --quick form: the stand-ins of Qwen2-0.5B and
DeBERTa-v3-large at one layer each (every width, vocabulary and tokenizer type real) train 2 iterations on 2 CPU
ranks under ZeRO-3 in bf16 and export their checkpoint; the memory plan the run printed and saved before loading
predicts the per-phase peaks it then measured. The resume is left to tests/test_checkpoint.py, which resumes a ZeRO-3 bf16 run
of tiny models bit for bit (a resumed run here costs another minute of launch, load and iteration).

One run of about 1.5 minutes; the whole matrix (ZeRO-2/3 x fp32/bf16) with its resumes is
``python launch/rehearse.py --quick``.
"""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

from rehearse import memory_comparison  # noqa: E402


def test_quick_rehearsal_trains_and_exports_at_the_real_shapes(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "rehearse.py"), "--quick", "--stages", "3",
                           "--precisions", "bf16", "--no_resume", "--iterations", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[rehearse] zero3_bf16: ok" in proc.stdout
    run = tmp_path / "zero3_bf16"
    config = json.loads((run / "config.json").read_text())
    assert config["precision"] == "bf16" and config["zero_stage"] == 3 and config["gradient_checkpointing"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # every pair the reward model read was a long dialogue cut from the left to reward_max_len
    assert all(m["reward_inputs_truncated"] == 1.0 for m in metrics)
    exported = json.loads((tmp_path / "zero3_bf16_policy" / "config.json").read_text())
    assert exported["vocab_size"] == 151936 and exported["hidden_size"] == 896 and exported["tie_word_embeddings"]
    # the memory planner (rlhf_ds/memory.py) against the second iteration's measured peaks, within 15% per phase:
    # the plan is the steady state, and Adam's moments only exist from the first optimizer step on
    assert "memory plan:" in (run.parent / "zero3_bf16.log").read_text()
    for phase, (measured, predicted) in memory_comparison(str(run)).items():
        assert abs(predicted - measured) <= 0.15 * measured, (phase, measured, predicted)
